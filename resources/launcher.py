"""Runs training out of the orchestrator's process, through Dagster Pipes."""


import json
import sys
from pathlib import Path
from typing import Literal

import dagster as dg

from alignment_pipelines.methods import run_training
from alignment_pipelines.methods.base import TrainingConfig, TrainResult
from alignment_pipelines.tracking import WORKER_MLFLOW_RUN_ENV, WORKER_MLFLOW_URI_ENV, Tracker, step_callback



class TrainingLauncher(dg.ConfigurableResource):
    """Hands a typed config to `alignment-pipelines train <method>` and returns its result.

    `subprocess` (the default) runs the worker through `PipesSubprocessClient`, which streams
    its logs and metrics into the Dagster run; `in_process` calls the same code directly and is
    meant for unit tests and debugging.
    """

    mode: Literal["subprocess", "in_process"] = "subprocess"
    python: str | None = None  # interpreter for the worker; defaults to this one

    def launch(self, context: dg.AssetExecutionContext, method: str, config: TrainingConfig,
               tracker: Tracker, mlflow_run_id: str) -> TrainResult:
        config.validate()
        if self.mode == "in_process":
            callbacks = [tracker.metrics_callback(mlflow_run_id), step_callback(
                lambda step, logs: context.log.info(f"step {step}: {json.dumps(logs, default=str)}"))]
            return run_training(method, config, callbacks=callbacks)
        return self._launch_subprocess(context, method, config, tracker, mlflow_run_id)

    def _launch_subprocess(self, context, method, config, tracker, mlflow_run_id) -> TrainResult:
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
