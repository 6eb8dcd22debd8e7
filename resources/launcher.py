"""Runs training out of the orchestrator's process, through Dagster Pipes."""

import json
import sys
from pathlib import Path

import dagster as dg

from alignment_pipelines.methods import MethodConfig, TrainResult
from alignment_pipelines.tracking import WORKER_MLFLOW_RUN_ENV, WORKER_MLFLOW_URI_ENV, Tracker


class TrainingLauncher(dg.ConfigurableResource):
    """Hands a validated config to `alignment-pipelines train <method> --config FILE` and returns its result.

    The worker runs through `PipesSubprocessClient`, which streams its logs and metrics into the
    Dagster run; the worker also streams step metrics into the MLflow run it is given.
    """

    python: str | None = None  # interpreter for the worker; defaults to this one

    def launch(self, context: dg.AssetExecutionContext, method: str, config: MethodConfig,
               tracker: Tracker, mlflow_run_id: str) -> TrainResult:
        config.validate()
        output_dir = Path(config.output_dir)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        config_file = output_dir.parent / f"{output_dir.name}.config.json"
        config_file.write_text(json.dumps(config.to_dict(), indent=2))
        command = [self.python or sys.executable, "-m", "alignment_pipelines.cli",
                   "train", method, "--config", str(config_file)]
        # Pipes passes this process's environment on; these are added to it.
        env = {WORKER_MLFLOW_URI_ENV: tracker.tracking_uri, WORKER_MLFLOW_RUN_ENV: mlflow_run_id,
               "TOKENIZERS_PARALLELISM": "false"}
        invocation = dg.PipesSubprocessClient().run(context=context, command=command, env=env)
        results = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and "metrics" in m]
        if not results:
            raise dg.Failure(f"training worker for {method} reported no result; see the run's logs")
        return TrainResult(**results[-1])
