"""Runs training out of the orchestrator's process, through Dagster Pipes: a local subprocess, or a Kubernetes pod.

Every launcher runs the same worker command (``alignment_pipelines.launch.worker_command``)::

    [accelerate launch --multi_gpu --num_processes N ...] -m alignment_pipelines.cli train METHOD --config-json JSON

with the config as data and its paths relative to the data root, so that only the data root's location differs
between this machine and a pod. ``num_processes`` > 1 or ``deepspeed`` in the method config puts the worker under
``accelerate launch``. Which launcher runs is chosen per deployment (``alignment_pipelines/definitions.py``).
"""

import copy
import json
import os
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import dagster as dg
from pydantic import Field

from alignment_pipelines.launch import (check_multi_process, free_port, outside_root, relative_to_root,
                                        uses_accelerate, worker_command, write_deepspeed_config)
from alignment_pipelines.layout import DATA_ROOT_ENV, MLFLOW_URI_ENV, default_data_root
from alignment_pipelines.methods import METHOD_PLUGINS_ENV, ConfigError, MethodConfig, TrainResult, get_method
from alignment_pipelines.resources import Bound
from alignment_pipelines.tracking import WORKER_MLFLOW_RUN_ENV, WORKER_MLFLOW_URI_ENV, Tracker

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
WORKER_UID = 1000
"""The worker image's unprivileged user (deploy/k8s/Dockerfile.worker); the pod runs as it, never as root."""
POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": WORKER_UID, "runAsGroup": WORKER_UID,
                        "fsGroup": WORKER_UID, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "privileged": False,
                              "capabilities": {"drop": ["ALL"]}}


class TrainingLauncher(dg.ConfigurableResource):
    """The subprocess launcher: the worker runs on this machine through ``PipesSubprocessClient``, which streams its
    logs and metrics into the Dagster run; the worker also streams step metrics into the MLflow run it is given.

    Subclasses (:class:`K8sLauncher`) run the same command elsewhere by overriding :meth:`run_worker`.
    """

    python: Bound[str | None] = Field(default=None, description="interpreter for the worker; default: this one")

    @property
    def kind(self) -> str:
        return "subprocess"

    def runs_here(self) -> bool:
        """Whether the worker runs on this machine, so that this machine's limits (memory, GPU) apply at launch."""
        return True

    def worker_root(self, data_root: Path) -> str:
        """Where the worker sees the data root."""
        return str(data_root)

    def launch(self, context: dg.AssetExecutionContext, method: str, config: MethodConfig, tracker: Tracker,
               mlflow_run_id: str, data_root: str | os.PathLike | None = None) -> TrainResult:
        """Validate ``config`` (this machine's rules only where the worker runs here), run the worker, return its
        result. A config that cannot run fails at once, without retries."""
        root = Path(data_root or default_data_root()).resolve()
        command, env = self.worker_invocation(method, config, tracker.tracking_uri, mlflow_run_id, root)
        if uses_accelerate(config.num_processes, config.deepspeed):
            context.log.info(f"{method}: {config.num_processes} process(es) through accelerate launch"
                             + (f", DeepSpeed {config.deepspeed}" if config.deepspeed else ""))
        invocation = self.run_worker(context, method, command, env, config, root)
        results = [m for m in invocation.get_custom_messages() if isinstance(m, dict) and "metrics" in m]
        if not results:
            raise dg.Failure(f"training worker for {method} reported no result; see the run's logs")
        return TrainResult(**results[-1])

    def worker_invocation(self, method: str, config: MethodConfig, tracking_uri: str, mlflow_run_id: str,
                          data_root: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
        """(command, environment) of the worker: the config as data, its paths relative to the data root."""
        root = Path(data_root).resolve()
        try:
            check_multi_process(get_method(method), config)
            config.validate(machine=self.runs_here())
        except ConfigError as error:
            raise dg.Failure(f"{method}: invalid config: {error}", allow_retries=False) from error
        values = relative_to_root(config.to_dict(), type(config), root)
        self.check_paths(values, type(config))
        deepspeed = write_deepspeed_config(config.deepspeed, Path(config.output_dir).parent)
        command = worker_command(
            method, values, python=self.worker_python(), num_processes=config.num_processes,
            mixed_precision=config.mixed_precision, deepspeed_file=self.worker_path(deepspeed, root),
            main_process_port=self.rendezvous_port(config))
        env = {WORKER_MLFLOW_URI_ENV: tracking_uri, WORKER_MLFLOW_RUN_ENV: mlflow_run_id,
               DATA_ROOT_ENV: self.worker_root(root), "TOKENIZERS_PARALLELISM": "false"}
        return command, self.worker_env(env)

    # ---- what subclasses change -------------------------------------------------------------------
    def worker_python(self) -> str:
        return self.python or sys.executable

    def rendezvous_port(self, config: MethodConfig) -> int | None:
        """A free port for torchrun here: two local runs must not share one."""
        return free_port() if uses_accelerate(config.num_processes, config.deepspeed) else None

    def worker_path(self, path: Path | None, root: Path) -> str | None:
        """``path`` as the worker sees it."""
        if path is None:
            return None
        try:
            relative = Path(path).resolve().relative_to(root)
        except ValueError:
            return str(path)
        return str(PurePosixPath(self.worker_root(root), *relative.parts))

    def check_paths(self, values: dict[str, Any], config_cls) -> None:
        """Here every path resolves as it is."""

    def worker_env(self, env: dict[str, str]) -> dict[str, str]:
        """Variables beside the ones every worker gets (a subprocess inherits this process's environment too)."""
        return env

    def run_worker(self, context: dg.AssetExecutionContext, method: str, command: list[str], env: dict[str, str],
                   config: MethodConfig, root: Path) -> dg.PipesClientCompletedInvocation:
        # Pipes passes this process's environment on; these are added to it.
        return dg.PipesSubprocessClient().run(context=context, command=command, env=env)


class K8sLauncher(TrainingLauncher):
    """Runs the worker in a Kubernetes pod through ``dagster_k8s.PipesK8sClient`` (logs, metrics and the result come
    back through the pod's log stream).

    The pod: the worker image, GPU requests and limits (one GPU per process unless ``gpus`` says otherwise), node
    selector and tolerations, the environment that points at the MLflow server, the data root on a shared volume
    (a ReadWriteMany PersistentVolumeClaim) mounted at ``data_mount_path``, and a securityContext: the image's
    unprivileged user (uid 1000), no privilege escalation, no capabilities, the runtime's default seccomp profile.
    Mount the data root at the same path as the orchestrator's (the default): model folders record their start
    model by path.
    """

    # Every field is Bound (resources/__init__.py): the deployment sets it, a run config cannot.
    image: Bound[str] = Field(description="the worker image: the project installed with the gpu extra on a CUDA base")
    namespace: Bound[str] = Field(default="default", description="namespace the training pods run in")
    python: Bound[str | None] = Field(default="python", description="the interpreter inside the image")
    gpus: Bound[int | None] = Field(default=None,
                                    description="GPUs per pod; unset: the method config's num_processes")
    gpu_resource: Bound[str] = Field(default="nvidia.com/gpu", description="the extended resource name of a GPU")
    cpu: Bound[str | None] = Field(default=None, description="CPU request (e.g. '8'); unset: none")
    memory: Bound[str | None] = Field(default=None,
                                      description="memory request and limit (e.g. '64Gi'); unset: none")
    node_selector: Bound[dict[str, str]] = Field(default_factory=dict,
                                                 description="node labels the pod must match, e.g. a GPU type")
    tolerations: Bound[list[dict[str, str]]] = Field(
        default_factory=lambda: [dict(GPU_TOLERATION)], description="taints the pod tolerates (default: GPU nodes')")
    data_volume_claim: Bound[str] = Field(
        default="alignment-pipelines-data", description="the PersistentVolumeClaim (ReadWriteMany) of the data root")
    data_mount_path: Bound[str | None] = Field(
        default=None, description="where the data root is mounted; unset: the orchestrator's path")
    shm_size: Bound[str | None] = Field(
        default="8Gi", description="size of /dev/shm (NCCL and data loaders need more than the container default); "
                                   "unset: the default")
    mlflow_tracking_uri: Bound[str | None] = Field(
        default=None, description="the MLflow server as the pod reaches it; unset: the orchestrator's tracking URI")
    env: Bound[dict[str, str]] = Field(default_factory=dict,
                                       description="more environment variables for the worker")
    env_from_secrets: Bound[list[str]] = Field(
        default_factory=list, description="Secrets whose keys become environment variables (credentials)")
    service_account_name: Bound[str | None] = Field(default=None, description="the pod's service account")
    image_pull_policy: Bound[str] = Field(default="IfNotPresent", description="when the node pulls the image")
    labels: Bound[dict[str, str]] = Field(default_factory=dict, description="extra labels on the pod")
    load_incluster_config: Bound[bool | None] = Field(
        default=None, description="talk to the cluster from inside it; unset: in-cluster when running in a pod")
    kubeconfig_file: Bound[str | None] = Field(default=None, description="kubeconfig when not in the cluster")
    kube_context: Bound[str | None] = Field(default=None, description="kubeconfig context")

    @property
    def kind(self) -> str:
        return "k8s"

    def runs_here(self) -> bool:
        return False

    def worker_root(self, data_root: Path) -> str:
        return self.data_mount_path or str(data_root)

    def worker_python(self) -> str:
        return self.python or "python"

    def rendezvous_port(self, config: MethodConfig) -> int | None:
        return None  # a pod of its own: torchrun's default port is free

    def check_paths(self, values: dict[str, Any], config_cls) -> None:
        outside = outside_root(values, config_cls)
        if outside:
            raise dg.Failure(f"these paths lie outside the data root, so a pod cannot see them: {outside}; put them "
                             "under the data root (the shared volume)", allow_retries=False)

    def pod_manifest(self, method: str, command: list[str], env: dict[str, str], config: MethodConfig,
                     data_root: Path) -> dict[str, Any]:
        """The pod as a Kubernetes manifest (metadata + spec, camelCase keys), before Pipes adds its own variables
        and names it. ``PipesK8sClient`` takes it as ``base_pod_meta`` and ``base_pod_spec``."""
        gpus = self.gpus if self.gpus is not None else config.num_processes
        resources: dict[str, dict[str, str]] = {"requests": {}, "limits": {}}
        if gpus:
            resources["requests"][self.gpu_resource] = resources["limits"][self.gpu_resource] = str(gpus)
        if self.cpu:
            resources["requests"]["cpu"] = self.cpu
        if self.memory:
            resources["requests"]["memory"] = resources["limits"]["memory"] = self.memory
        mount = self.worker_root(data_root)
        container: dict[str, Any] = {
            "name": "training",
            "image": self.image,
            "imagePullPolicy": self.image_pull_policy,
            "command": command,
            "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
            "resources": {k: v for k, v in resources.items() if v},
            "volumeMounts": [{"name": "data", "mountPath": mount}],
            "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
        }
        if self.env_from_secrets:
            container["envFrom"] = [{"secretRef": {"name": name}} for name in self.env_from_secrets]
        volumes: list[dict[str, Any]] = [{"name": "data",
                                          "persistentVolumeClaim": {"claimName": self.data_volume_claim}}]
        if self.shm_size:
            container["volumeMounts"].append({"name": "dshm", "mountPath": "/dev/shm"})
            volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.shm_size}})
        spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container], "volumes": volumes,
                                "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT)}
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        if self.tolerations and gpus:
            spec["tolerations"] = [dict(t) for t in self.tolerations]
        if self.service_account_name:
            spec["serviceAccountName"] = self.service_account_name
        labels = {"app.kubernetes.io/name": "alignment-pipelines", "app.kubernetes.io/component": "training",
                  "alignment-pipelines/method": method, **self.labels}
        return {"metadata": {"labels": labels}, "spec": spec}

    def worker_env(self, env: dict[str, str]) -> dict[str, str]:
        """A pod inherits nothing: MLflow (as the pod reaches it), the method plugins, then the configured ones."""
        uri = self.mlflow_tracking_uri or env[WORKER_MLFLOW_URI_ENV]
        out = dict(env) | {WORKER_MLFLOW_URI_ENV: uri, MLFLOW_URI_ENV: uri, "HF_HUB_OFFLINE": "1",
                           "MLFLOW_ENABLE_TELEMETRY": "false"}
        if os.environ.get(METHOD_PLUGINS_ENV):
            out[METHOD_PLUGINS_ENV] = os.environ[METHOD_PLUGINS_ENV]
        return out | dict(self.env)

    def render_pod(self, method: str, config: MethodConfig, tracking_uri: str, mlflow_run_id: str,
                   data_root: str | os.PathLike) -> dict[str, Any]:
        """The pod this launcher would start for ``config`` (what :meth:`run_worker` hands to Pipes)."""
        command, env = self.worker_invocation(method, config, tracking_uri, mlflow_run_id, data_root)
        return self.pod_manifest(method, command, env, config, Path(data_root).resolve())

    def run_worker(self, context: dg.AssetExecutionContext, method: str, command: list[str], env: dict[str, str],
                   config: MethodConfig, root: Path) -> dg.PipesClientCompletedInvocation:
        try:
            from dagster_k8s import PipesK8sClient
        except ImportError as error:  # the orchestrator's image lacks it
            raise dg.Failure("the k8s launcher needs dagster-k8s (pip install dagster-k8s, the version matching "
                             "dagster)", allow_retries=False) from error
        if env[WORKER_MLFLOW_URI_ENV].startswith(("sqlite:", "file:")) or "://" not in env[WORKER_MLFLOW_URI_ENV]:
            context.log.warning(f"MLflow at {env[WORKER_MLFLOW_URI_ENV]!r} is a local store: the pod reaches it only "
                                "through the shared volume; set MLFLOW_TRACKING_URI to the MLflow server")
        if self.data_mount_path and Path(self.data_mount_path) != root:
            context.log.warning(f"the pod mounts the data root at {self.data_mount_path}, this process sees it at "
                                f"{root}: model folders that record their start model by path may not load there")
        manifest = self.pod_manifest(method, command, env, config, root)
        context.log.info(f"training pod for {method}: {json.dumps(manifest['spec']['containers'][0]['resources'])} "
                         f"in namespace {self.namespace}, image {self.image}")
        client = PipesK8sClient(load_incluster_config=self.load_incluster_config,
                                kubeconfig_file=self.kubeconfig_file, kube_context=self.kube_context)
        return client.run(context=context, namespace=self.namespace, base_pod_meta=manifest["metadata"],
                          base_pod_spec=manifest["spec"])


LAUNCHERS: dict[str, type[TrainingLauncher]] = {"subprocess": TrainingLauncher, "k8s": K8sLauncher}
