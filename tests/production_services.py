"""Real services on 127.0.0.1 for the production tests, started as deploy/docker-compose.yaml starts them.

Postgres (Debian's server binaries, run as an unprivileged user), the MLflow tracking server on it, and
Dagster as compose runs it: `dagster instance migrate`, then the code location as its own gRPC server,
`dagster-webserver` and `dagster-daemon run`, with deploy/workspace.yaml as the workspace and
deploy/dagster.postgres.yaml as the instance (the environment fills both in; only run monitoring polls faster,
``TEST_RUN_MONITORING``). The code server serves ``production_location`` (alignment_pipelines.definitions with
faster ticks, see that module).

Each service runs in its own process group and logs to a file; `Service.stop` ends the group (SIGTERM, or
SIGINT for Postgres, then SIGKILL), and the session fixture stops them all in its finalizer, after copying
the logs and a run timeline (logs/runs.txt) to the artifacts folder. Every wait is bounded.

Imported by the Dagster processes too (``ALIGNMENT_PIPELINES_METHOD_PLUGINS``): with ``SCOPE_ENV`` set,
the method registry is cut to the methods named there, with small step counts as their defaults, so the
automation (which launches runs without run config) retrains the tiny model in seconds. Without it, importing
this module changes nothing.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
# CI sets this: a missing server binary or browser is a failure there, a skip on a developer's machine.
REQUIRE_ENV = "ALIGNMENT_PIPELINES_REQUIRE_PRODUCTION_TESTS"
# "sft,dpo": the methods the Dagster processes keep; each trains SCOPE_DEFAULTS steps by default.
SCOPE_ENV = "ALIGNMENT_PIPELINES_TEST_METHODS"
SCOPE_DEFAULTS = {"max_steps": 2, "max_length": 96, "save_steps": 1, "gradient_checkpointing": False,
                  "per_device_batch_size": 4}
PG_USER = "alignment"
ARTIFACTS_ENV = "ALIGNMENT_PIPELINES_TEST_ARTIFACTS"
TIMEOUT_SCALE_ENV = "ALIGNMENT_PIPELINES_TEST_TIMEOUT_SCALE"
# SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; dagster-postgres and MLflow are run on psycopg2.
SQLALCHEMY_SCHEME = "postgresql+psycopg2"
LOCATION = "alignment_pipelines"
# As compose's `code` service: the code server outlives a minute without its proxy's heartbeat (a busy CPU).
CODE_SERVER_HEARTBEAT_TTL = "300"
# What the tests change in deploy/dagster.postgres.yaml, only to wait seconds instead of a minute: the daemon's
# run monitoring polls every 5 s and frees a dead run's `training` slot 5 s after the run ended.
TEST_RUN_MONITORING = {"poll_interval_seconds": 5, "free_slots_after_run_end_seconds": 5}
PLUGIN_MODULE = "production_services"  # importable from tests/, which the services get on PYTHONPATH
# alignment_pipelines.definitions with the automation sensor ticking every few seconds (see the module)
CODE_LOCATION_MODULE = "production_location"


class Unavailable(RuntimeError):
    """A prerequisite (server binary, browser) is not installed."""


def require(condition: bool, what: str) -> None:
    """Skip (or, under CI's REQUIRE_ENV, fail) when a prerequisite is missing."""
    if condition:
        return
    import pytest

    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{what} (required: {REQUIRE_ENV} is set)", pytrace=False)
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 1.0,
               on_timeout: Callable[[], str] | None = None):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds saying ``what``.
    ``TIMEOUT_SCALE_ENV`` stretches every bound (a shared, busy machine)."""
    timeout *= float(os.environ.get(TIMEOUT_SCALE_ENV) or 1)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")
        time.sleep(interval)


def http_ok(url: str, timeout: float = 3.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return 200 <= reply.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Service:
    """One process (and whatever it starts) in its own process group, logging to ``log_dir/<name>.log``."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None, cwd: Path = ROOT,
                 user: str | None = None, stop_signal: int = signal.SIGTERM):
        self.name, self.argv, self.env, self.cwd, self.user = name, argv, env, cwd, user
        self.stop_signal = stop_signal
        self.log_path = Path(log_dir) / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Service":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} start {' '.join(self.argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, user=self.user)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return f"--- {self.log_path.name} (tail) ---\n" + self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return f"--- {self.log_path.name}: no log ---"

    def wait_ready(self, ready: Callable[[], object], timeout: float) -> "Service":
        def check():
            if not self.running:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}\n{self.log_tail()}")
            return ready()

        wait_until(check, timeout, f"{self.name} to be ready", interval=0.5, on_timeout=self.log_tail)
        return self

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crash would: nothing gets to clean up."""
        if self.process is None:
            return
        self._signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)

    def request_stop(self) -> None:
        """Send the stop signal (SIGTERM) to the group without waiting; `stop` waits."""
        if self.process is not None and self.process.poll() is None:
            self._signal_group(self.stop_signal)

    def stop(self, timeout: float = 20) -> None:
        """Send the stop signal to the group, then SIGKILL whatever is left of it after ``timeout``."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.request_stop()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # children that outlived their parent
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def postgres_bin_dir() -> Path | None:
    """Debian's server binaries (/usr/lib/postgresql/<version>/bin), or a PATH with initdb on it."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def unprivileged_user() -> str | None:
    """Postgres refuses to run as root: as root, run it as the `postgres` account (Debian's package makes it)
    or `nobody`; as anyone else, as that user (None)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise Unavailable("running as root and there is no unprivileged account for Postgres")


@dataclass
class Postgres:
    """A throwaway Postgres server on 127.0.0.1 with password (scram) authentication over TCP."""

    log_dir: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    service: Service | None = None
    data_dir: Path | None = None

    def start(self, timeout: float = 60) -> "Postgres":
        bindir = postgres_bin_dir()
        if bindir is None:
            raise Unavailable("no Postgres server binaries (apt-get install postgresql)")
        user = unprivileged_user()
        # The cluster lives outside root's private temp folders so the unprivileged account can reach it.
        self.data_dir = Path(tempfile.mkdtemp(prefix="alignment-pg-"))
        password_file = self.data_dir / "pwfile"
        password_file.write_text(self.password + "\n")
        if user:
            entry = pwd.getpwnam(user)
            for path in (self.data_dir, password_file):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        cluster = self.data_dir / "cluster"
        subprocess.run([str(bindir / "initdb"), "-D", str(cluster), "-U", PG_USER, "--pwfile", str(password_file),
                        "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C.UTF-8"],
                       check=True, capture_output=True, timeout=120, user=user, cwd=self.data_dir)
        password_file.unlink()
        self.service = Service("postgres", [
            str(bindir / "postgres"), "-D", str(cluster), "-h", "127.0.0.1", "-p", str(self.port),
            "-k", str(self.data_dir),  # the Unix socket stays in the test's own folder
            # a test database: durability off for speed (never in production)
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200"], self.log_dir, user=user, cwd=self.data_dir,
            stop_signal=signal.SIGINT).start()  # "fast" shutdown: ends the sessions (SIGTERM waits for them)
        self.service.wait_ready(self._accepts_connections, timeout)
        return self

    def _accepts_connections(self) -> bool:
        import psycopg2

        try:
            psycopg2.connect(self.url("postgres"), connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            return False

    def url(self, database: str, scheme: str = "postgresql") -> str:
        """libpq's URL; SQLAlchemy users (MLflow, Dagster) need the scheme ``postgresql+psycopg2``."""
        return f"{scheme}://{PG_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg2

        connection = psycopg2.connect(self.url("postgres"), connect_timeout=5)
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def stop(self) -> None:
        if self.service:
            self.service.stop()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def scoped_methods_env(methods: str) -> dict[str, str]:
    """Environment that makes the Dagster processes keep only ``methods`` (e.g. "sft,dpo"), with small defaults."""
    return {SCOPE_ENV: methods, "ALIGNMENT_PIPELINES_METHOD_PLUGINS": PLUGIN_MODULE}


@dataclass
class Stack:
    """Postgres + MLflow server + Dagster (code server, webserver, daemon) on free ports, one data root."""

    workdir: Path
    methods: str = "sft"
    automation_interval: int = 10
    services: dict[str, Service] = field(default_factory=dict)
    postgres: Postgres | None = None

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.logs = self.workdir / "logs"
        self.dagster_home = self.workdir / "dagster_home"
        self.data_root = self.workdir / "data"
        self.mlflow_artifacts = self.workdir / "mlflow-artifacts"
        self.ports = {name: free_port() for name in ("mlflow", "code", "webserver")}
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._cpu_at_start, self._started = used.ru_utime + used.ru_stime, time.monotonic()
        self._reader = None  # see `instance`

    # ---- addresses ----------------------------------------------------------------------------------
    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def dagster_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['webserver']}"

    @property
    def inbox(self) -> Path:
        return self.data_root / "inbox"

    def env(self) -> dict[str, str]:
        """What compose's .env gives the Dagster containers, pointed at this host's ports."""
        pg = self.postgres
        return {
            **os.environ,
            "DAGSTER_HOME": str(self.dagster_home),
            "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(pg.port), "DAGSTER_PG_USER": PG_USER,
            "DAGSTER_PG_PASSWORD": pg.password, "DAGSTER_PG_DB": "dagster",
            "DAGSTER_CODE_SERVER_HOST": "127.0.0.1", "DAGSTER_CODE_SERVER_PORT": str(self.ports["code"]),
            "ALIGNMENT_PIPELINES_DEPLOYMENT": "production",
            "ALIGNMENT_PIPELINES_HOME": str(self.data_root),
            "ALIGNMENT_PIPELINES_BASE_MODEL": "tiny-random",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
            "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1",
            "ALIGNMENT_PIPELINES_TEST_AUTOMATION_INTERVAL": str(self.automation_interval),
            **scoped_methods_env(self.methods),
        }

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "Stack":
        """Start every service; returns once they are launched (see `wait_ready`)."""
        for path in (self.logs, self.dagster_home, self.inbox, self.mlflow_artifacts):
            path.mkdir(parents=True, exist_ok=True)
        self._write_instance_file()
        self.postgres = Postgres(self.logs).start()
        self.postgres.create_database("mlflow")
        self.postgres.create_database("dagster")
        env = self.env()
        # compose's `dagster-init` service: create the instance's tables once, before anything uses them
        migrate = subprocess.run([str(BIN / "dagster"), "instance", "migrate"], env=env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=180)
        if migrate.returncode:
            raise RuntimeError(f"dagster instance migrate failed:\n{migrate.stdout[-3000:]}{migrate.stderr[-3000:]}")
        self._add("mlflow", [str(BIN / "mlflow"), "server",
                             "--backend-store-uri", self.postgres.url("mlflow", scheme=SQLALCHEMY_SCHEME),
                             "--artifacts-destination", str(self.mlflow_artifacts), "--serve-artifacts",
                             "--host", "127.0.0.1", "--port", str(self.ports["mlflow"]), "--workers", "1"],
                  env | {"MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        self._add("code", [str(BIN / "dagster"), "code-server", "start", "-m", CODE_LOCATION_MODULE,
                           "--location-name", LOCATION, "-h", "127.0.0.1", "-p", str(self.ports["code"]),
                           "--heartbeat-ttl", CODE_SERVER_HEARTBEAT_TTL, "--log-format", "json"], env)
        self._add("webserver", [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(self.ports["webserver"]),
                                "-w", str(DEPLOY / "workspace.yaml"), "--log-format", "json"], env)
        self.start_daemon()
        return self

    def _write_instance_file(self) -> None:
        """deploy/dagster.postgres.yaml as $DAGSTER_HOME/dagster.yaml, with the faster run monitoring above."""
        import yaml

        settings = yaml.safe_load((DEPLOY / "dagster.postgres.yaml").read_text())
        settings["run_monitoring"].update(TEST_RUN_MONITORING)
        (self.dagster_home / "dagster.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))

    def wait_ready(self, timeout: float = 240) -> "Stack":
        """The MLflow server answers and the webserver has loaded the code location from the code server."""
        self.services["mlflow"].wait_ready(lambda: http_ok(f"{self.mlflow_uri}/health"), timeout)
        self.services["webserver"].wait_ready(self._location_loaded, timeout)
        return self

    def _add(self, name: str, argv: list[str], env: dict) -> Service:
        self.services[name] = Service(name, argv, self.logs, env=env).start()
        return self.services[name]

    def start_daemon(self) -> Service:
        """`dagster-daemon run` (again, after a crash: the same log file continues)."""
        return self._add("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(DEPLOY / "workspace.yaml"),
                                    "--log-format", "json"], self.env())

    def run_worker(self, run_id: str):
        """The run's worker process (the code server starts one per run; it logs its pid), or None."""
        import re

        import dagster as dg
        import psutil

        for event in self.instance().all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            found = re.match(r"Started process for run \(pid: (\d+)\)", event.message or "")
            if found:
                try:
                    return psutil.Process(int(found.group(1)))
                except psutil.NoSuchProcess:
                    return None
        return None

    def kill_run_worker(self, run_id: str) -> list[int]:
        """SIGKILL the run's worker and every process it started (the training worker), as an OOM kill would.
        The worker is stopped first, so it cannot start another process while its children are collected."""
        import psutil

        worker = self.run_worker(run_id)
        if worker is None:
            raise RuntimeError(f"run {run_id} has no live worker")
        worker.suspend()
        victims = [worker, *worker.children(recursive=True)]
        for process in victims:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=30)
        return [p.pid for p in victims]

    def _location_loaded(self) -> bool:
        try:
            data = self.graphql("{ workspaceOrError { ... on Workspace { locationEntries { name "
                                "locationOrLoadError { __typename } } } } }", timeout=5)
        except (OSError, ValueError, RuntimeError):
            return False
        entries = data["workspaceOrError"].get("locationEntries") or []
        return any(e["name"] == LOCATION and (e["locationOrLoadError"] or {}).get("__typename") == "RepositoryLocation"
                   for e in entries)

    def write_report(self) -> Path:
        """logs/runs.txt: every run with its steps' timings, for the artifacts (and a failing CI run)."""
        path = self.logs / "runs.txt"
        lines = []
        try:
            instance = self.instance()
            for record in reversed(instance.get_run_records(limit=100)):
                run = record.dagster_run
                selection = sorted(k.to_user_string() for k in run.asset_selection or [])
                lines.append(f"{run.run_id} {run.status.value:<9} {_clock(record.create_timestamp.timestamp())}"
                             f" partition={run.tags.get('dagster/partition', '-')} assets={selection}")
                start = record.create_timestamp.timestamp()
                for event in instance.all_logs(run.run_id):
                    kind = event.dagster_event.event_type_value if event.is_dagster_event else ""
                    if kind in _REPORTED_EVENTS:
                        lines.append(f"    +{event.timestamp - start:6.1f}s {kind:<22} {event.step_key or ''}")
        except Exception as error:  # the report must not hide the failure it is there to explain
            lines.append(f"report incomplete: {error!r}")
        path.write_text("\n".join(lines) + "\n")
        return path

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.dispose()
            self._reader = None
        # the daemon first (nothing new is launched), then the others all at once, the stores last
        order = [self.services[name] for name in ("daemon", "webserver", "code", "mlflow") if name in self.services]
        if order and order[0].name == "daemon":
            order.pop(0).stop()
        for service in order:
            service.request_stop()
        for service in order:
            service.stop()
        if self.postgres:
            self.postgres.stop()
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = used.ru_utime + used.ru_stime - self._cpu_at_start
        with open(self.logs / "runs.txt", "a") as report:
            report.write(f"stack: {time.monotonic() - self._started:.0f}s wall; child processes of this pytest "
                         f"used {cpu:.0f}s CPU meanwhile\n")

    def log_tails(self, chars: int = 3000) -> str:
        services = list(self.services.values()) + ([self.postgres.service] if self.postgres and self.postgres.service else [])
        return "\n".join(s.log_tail(chars) for s in services)

    # ---- clients --------------------------------------------------------------------------------------
    def graphql(self, query: str, variables: dict | None = None, timeout: float = 30) -> dict:
        import urllib.request

        request = urllib.request.Request(f"{self.dagster_url}/graphql",
                                         data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            body = json.loads(reply.read())
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def instance(self):
        """A read-side handle on the same Postgres instance, for the test's own checks (starts no daemon);
        one per stack, closed by `stop`."""
        import dagster as dg

        if self._reader is None:
            reader_home = self.workdir / "reader_home"
            reader_home.mkdir(exist_ok=True)
            (reader_home / "dagster.yaml").write_text(json.dumps(
                {"storage": {"postgres": {"postgres_url": self.postgres.url("dagster", scheme=SQLALCHEMY_SCHEME)}},
                 "telemetry": {"enabled": False}}))
            self._reader = dg.DagsterInstance.from_config(str(reader_home))
        return self._reader

    def mlflow_client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)


_REPORTED_EVENTS = {"PIPELINE_START", "PIPELINE_SUCCESS", "PIPELINE_FAILURE", "STEP_START", "STEP_SUCCESS",
                    "STEP_FAILURE", "STEP_UP_FOR_RETRY", "ASSET_CHECK_EVALUATION", "ENGINE_EVENT"}


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


# ---- the registry scope, applied inside the Dagster processes ------------------------------------------
def _scope_registry(names: list[str]) -> None:
    import dataclasses

    from alignment_pipelines import methods

    unknown = set(names) - set(methods.METHODS)
    if unknown:
        raise ValueError(f"{SCOPE_ENV}: unknown methods {sorted(unknown)}")
    for name in list(methods.METHODS):
        if name not in names:
            del methods.METHODS[name]
    for name, spec in list(methods.METHODS.items()):
        base = spec.config_cls
        hints = {f.name: hint for f, hint in base.field_specs()}
        overrides = [(key, hints[key], dataclasses.field(default=value, metadata=next(
                     f.metadata for f in dataclasses.fields(base) if f.name == key)))
                     for key, value in SCOPE_DEFAULTS.items() if key in hints]
        small = dataclasses.make_dataclass(base.__name__, overrides, bases=(base,))
        small.__module__, small.__doc__ = base.__module__, base.__doc__
        methods.METHODS[name] = dataclasses.replace(spec, config_cls=small)


if os.environ.get(SCOPE_ENV):
    _scope_registry([m.strip() for m in os.environ[SCOPE_ENV].split(",") if m.strip()])


# ---- what the tests do and look at --------------------------------------------------------------------------
MALFORMED = [
    '{"prompt": "What is 2+2?", "chosen": "4',  # truncated JSON
    json.dumps({"prompt": "Same?", "chosen": "yes", "rejected": "yes"}),
    json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}),
]


def demo_rows(count: int) -> list[str]:
    from alignment_pipelines.data.demo import demo_feedback_path

    return demo_feedback_path().read_text().splitlines()[:count]


def drop(inbox: Path, name: str, lines: list[str]) -> Path:
    """Write the file under a `.part` name, then rename it (as an uploader does), dated a minute ago."""
    partial = inbox / f"{name}.part"
    partial.write_text("\n".join(lines) + "\n")
    settled = time.time() - 60
    os.utime(partial, (settled, settled))
    os.replace(partial, inbox / name)
    return inbox / name


def batch_key(instance, prefix: str) -> str | None:
    return next((k for k in instance.get_dynamic_partitions("feedback_batches") if k.startswith(prefix)), None)


def verdict(instance, key: str | None) -> bool | None:
    """The blocking check's recorded verdict on a batch (None: no batch, or no verdict yet)."""
    from alignment_pipelines.assets.ingestion import gate_verdicts

    return gate_verdicts(instance, [key])[key] if key else None


def runs_of(instance, asset: str) -> list:
    import dagster as dg

    return [r for r in instance.get_runs() if r.asset_selection and dg.AssetKey(asset) in r.asset_selection]


def latest_materialization(instance, asset: str, partition: str | None = None):
    import dagster as dg

    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1).records
    return records[0] if records else None


# ---- the fixture the production tests share --------------------------------------------------------------
_shared: dict = {}


def production_stack_fixture(tmp_path_factory):
    """One stack for the session, shared by every module that imports ``production_stack`` (pytest makes one
    fixture per importing module, so they count references); stopped when the last of them is torn down.
    Its logs are copied to ``artifacts_dir()/logs``."""
    require(postgres_bin_dir() is not None, "no Postgres server binaries (apt-get install postgresql)")
    for module in ("psycopg2", "dagster_postgres"):
        try:
            __import__(module)
        except ImportError:
            require(False, f"{module} is not installed (pip install -e '.[postgres]')")
    if "stack" not in _shared:
        stack = Stack(tmp_path_factory.mktemp("production"), methods="sft,dpo")
        _shared.update(stack=stack, users=0)
        try:
            stack.start()
        except BaseException:
            stack.stop()
            _save_logs(stack)
            _shared.clear()
            raise
    _shared["users"] += 1
    try:
        yield _shared["stack"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            stack = _shared.pop("stack")
            stack.write_report()
            stack.stop()
            _save_logs(stack)


def artifacts_dir() -> Path:
    """Where the tests leave screenshots and service logs: $ALIGNMENT_PIPELINES_TEST_ARTIFACTS (CI sets it),
    else a folder in the system's temp dir."""
    folder = Path(os.environ.get(ARTIFACTS_ENV) or Path(tempfile.gettempdir()) / "alignment-pipelines-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _save_logs(stack: Stack) -> None:
    target = artifacts_dir() / "logs"
    target.mkdir(parents=True, exist_ok=True)
    for log in [*stack.logs.glob("*.log"), *stack.logs.glob("*.txt")]:
        shutil.copyfile(log, target / log.name)
