"""A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts served through the server, as in production) that a
test can SIGKILL and start again on the same port, database and artifact folder."""

from __future__ import annotations

import os
from pathlib import Path

from production_services import BIN, Service, free_port, http_ok

# A dead server fails each call at once instead of after MLflow's own retries (minutes with the defaults).
FAIL_FAST_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


class MlflowServer:
    def __init__(self, root: Path):
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.service = Service("mlflow", [
            str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ], root / "logs", env=os.environ | {"MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MlflowServer":
        self.service.start().wait_ready(lambda: http_ok(f"{self.uri}/health"), timeout=180)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing gets to finish a request."""
        self.service.kill()

    def stop(self) -> None:
        self.service.stop()
