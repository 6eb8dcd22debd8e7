"""`alignment-pipelines`: the same code the assets run, for users, scripts and GPU workers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from alignment_pipelines.layout import DataRoot, default_data_root
from alignment_pipelines.promotion import GateConfig
from alignment_pipelines.tracking import WORKER_MLFLOW_RUN_ENV, WORKER_MLFLOW_URI_ENV, Tracker, step_callback


def _validate(args: argparse.Namespace) -> int:
    from alignment_pipelines.data.importers import FeedbackFileError
    from alignment_pipelines.data.validation import validate_file

    try:
        result = validate_file(args.file)
    except (FeedbackFileError, ValueError) as exc:  # the file's own error (unreadable, over a cap), or a bad cap setting
        print(f"alignment-pipelines validate: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir) if args.output_dir else Path(args.file).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(args.file).name
    result.accepted.to_json(out_dir / f"{stem}.accepted.jsonl", orient="records", lines=True, force_ascii=False)
    result.quarantined.to_json(out_dir / f"{stem}.quarantine.jsonl", orient="records", lines=True, force_ascii=False)
    print(json.dumps(result.summary(), indent=2))
    return 0


def _submit(args: argparse.Namespace) -> int:
    """Copy a file into the inbox atomically: written under a hidden `.part` name (hashed as it is written),
    then linked to its name, which fails if the name is taken: the sensor never sees half a file, and a
    file already in the inbox (perhaps a batch not yet copied) is never overwritten."""
    import shutil
    import tempfile

    from alignment_pipelines.data.inbox import ContentHash, batch_key

    source = Path(args.file)
    if not source.is_file():
        raise SystemExit(f"alignment-pipelines submit: {source} is not a file")
    inbox = Path(args.inbox) if args.inbox else DataRoot(default_data_root()).inbox
    inbox.mkdir(parents=True, exist_ok=True)
    target = inbox / source.name
    refusal = (f"alignment-pipelines submit: {target} already exists; a batch is immutable, "
               "so submit new content under another name")
    if os.path.lexists(target):
        raise SystemExit(refusal)
    digest = ContentHash()
    with open(source, "rb") as reader, tempfile.NamedTemporaryFile(
            dir=inbox, prefix=f".{source.name}.", suffix=".part", delete=False) as partial:
        try:
            for data in iter(lambda: reader.read(1 << 20), b""):
                digest.update(data)
                partial.write(data)
            partial.flush()
            os.fsync(partial.fileno())
            shutil.copystat(source, partial.name)  # an old file keeps its age: settled at once
            os.link(partial.name, target)
        except FileExistsError:
            raise SystemExit(refusal) from None
        finally:
            os.unlink(partial.name)
    print(json.dumps({"inbox_file": str(target), "batch_key": batch_key(target, digest.hexdigest())}))
    return 0


def _training_data(path: str, work_dir: Path) -> str:
    """Parquet passes through; any file the importer reads is validated and its accepted rows used."""
    if path.endswith(".parquet"):
        return path
    from alignment_pipelines.data.records import write_records
    from alignment_pipelines.data.validation import validate_file
    from alignment_pipelines.launch import is_main_process, process_rank

    result = validate_file(path)
    if result.quarantined.shape[0] and is_main_process():
        print(f"{path}: {len(result.quarantined)} of {result.rows} rows quarantined "
              f"{result.counts_by_reason()}; training on the {len(result.accepted)} accepted rows",
              file=sys.stderr)
    work_dir.mkdir(parents=True, exist_ok=True)
    rank = f".rank{process_rank()}" if process_rank() else ""  # ranks of one run never write the same file
    target = work_dir / f"{Path(path).name}{rank}.accepted.parquet"
    write_records(result.accepted, target)
    return str(target)


def _train(args: argparse.Namespace) -> int:
    """Train one method. Under ``accelerate launch`` every rank runs this; only rank 0 reports (Pipes, MLflow) and
    prints the result. ``--config-json`` is the config as data, as the launchers pass it: its relative paths are
    relative to the data root (``ALIGNMENT_PIPELINES_HOME``); a ``--config`` file's are relative to the cwd."""
    from alignment_pipelines.launch import check_multi_process, is_main_process, resolve_from_root, world_size
    from alignment_pipelines.methods import ConfigError, config_from_dict, get_method, run_training
    from alignment_pipelines.models.loading import resolve_model

    spec = get_method(args.method)
    if args.config_json:
        values = resolve_from_root(json.loads(args.config_json), spec.config_cls, default_data_root())
    else:
        values = json.loads(Path(args.config).read_text()) if args.config else {}
    values.update(spec.config_cls.values_from_args(args))
    for needed in ("model", "data", "output_dir"):
        if not values.get(needed):
            raise SystemExit(f"alignment-pipelines train {args.method}: --{needed.replace('_', '-')} is required "
                             "(or give it in --config)")
    store = Path(args.model_store) if args.model_store else DataRoot(default_data_root()).model_store
    for name in _model_fields(spec.config_cls):
        if values.get(name):
            values[name] = str(resolve_model(values[name], store, allow_hub=args.allow_hub))
    work_dir = Path(values["output_dir"]).parent / f"{Path(values['output_dir']).name}.data"
    for name in ("data", "eval_data"):
        if values.get(name):
            values[name] = _training_data(values[name], work_dir)

    main = is_main_process()
    with _WorkerReporting(report=main) as report:  # opened first: validation's warnings (a vLLM fallback) reach it
        config = config_from_dict(args.method, values)
        if world_size() > 1:
            try:
                check_multi_process(spec, config)
            except ConfigError as error:
                raise SystemExit(f"alignment-pipelines train {args.method}: {error}") from None
        if main and config.num_processes != world_size():
            logging.getLogger("alignment_pipelines.launch").warning(
                "num_processes=%d, but %d process(es) are training: the launchers start the worker under "
                "`accelerate launch --multi_gpu --num_processes N -m alignment_pipelines.cli train ...`; run it so "
                "by hand for several", config.num_processes, world_size())
        result = run_training(args.method, config, callbacks=report.callbacks())
        report.finish(result)
        piped = report.pipes is not None
    if main and not piped:  # through Pipes the result is a message to the run, not text for the console
        print(result.to_json())
    return 0


def _model_fields(config_cls) -> list[str]:
    """Fields that name a model: the start model and any other model the method loads (a reward model)."""
    return [f.name for f, _ in config_cls.field_specs() if f.metadata.get("kind") == "model"]


class _WorkerReporting:
    """Streams step metrics to Dagster (when run through Pipes) and MLflow (when given a run), and forwards the
    warnings of ``alignment_pipelines`` loggers (a generation-backend fallback) to the Dagster run. ``report`` False
    (a rank other than 0): nothing is opened, no callback is added."""

    def __init__(self, report: bool = True):
        self.report = report

    def __enter__(self):
        import contextlib

        self._stack = contextlib.ExitStack()
        self.pipes = None
        self.tracker = None
        self.mlflow_run_id = os.environ.get(WORKER_MLFLOW_RUN_ENV)
        if not self.report:
            return self
        if os.environ.get("DAGSTER_PIPES_CONTEXT"):
            from dagster_pipes import open_dagster_pipes

            self.pipes = self._stack.enter_context(open_dagster_pipes())
            handler = _PipesLogHandler(self.pipes)
            logger = logging.getLogger("alignment_pipelines")
            logger.addHandler(handler)
            self._stack.callback(logger.removeHandler, handler)
        uri = os.environ.get(WORKER_MLFLOW_URI_ENV)
        if uri and self.mlflow_run_id:
            self.tracker = Tracker(uri)
        return self

    def callbacks(self) -> list:
        callbacks = []
        if self.tracker:
            callbacks.append(self.tracker.metrics_callback(self.mlflow_run_id))
        if self.pipes:
            pipes = self.pipes
            callbacks.append(step_callback(
                lambda step, logs: pipes.log.info(f"step {step}: {json.dumps(logs, default=str)}")))
        return callbacks

    def finish(self, result) -> None:
        if self.pipes:
            self.pipes.report_custom_message(json.loads(result.to_json()))

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


class _PipesLogHandler(logging.Handler):
    """Sends WARNING and above to the Dagster run's log through Pipes."""

    def __init__(self, pipes):
        super().__init__(level=logging.WARNING)
        self.pipes = pipes

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pipes.log.warning(self.format(record))
        except Exception:  # a log line must never fail the training
            self.handleError(record)


def _registry(args: argparse.Namespace):
    from mlflow import MlflowClient

    uri = args.tracking_uri or DataRoot(default_data_root()).ensure().tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _actor(args: argparse.Namespace) -> str:
    import getpass

    return args.actor or f"cli:{getpass.getuser()}"


def _promote(args: argparse.Namespace) -> int:
    """The gate on the newest evaluation (or --report), as the `promote` job runs it."""
    from alignment_pipelines.evaluation.report import newest_report
    from alignment_pipelines.evaluation.schema import EvaluationReport, ReportSchemaError
    from alignment_pipelines.promotion import PromotionRefused, promote_from_report

    every_evaluation = DataRoot(default_data_root()).training_dir("evaluation_report", "*").parent
    report = Path(args.report) if args.report else newest_report(every_evaluation)
    if report is None or not report.is_file():
        raise SystemExit("alignment-pipelines promote: no evaluation report found; run the evaluation first "
                         "or give --report")
    gate = GateConfig(**{f.name: getattr(args, f.name) for f in fields(GateConfig)})
    try:
        evaluation = EvaluationReport.read(report)  # first: a report this code cannot read touches no registry
        outcome = promote_from_report(_registry(args), evaluation, _actor(args), gate,
                                      readmit_rolled_back=args.readmit_rolled_back, seat_baseline=not args.no_incumbent)
    except (ReportSchemaError, PromotionRefused) as error:
        raise SystemExit(f"alignment-pipelines promote: {error}") from None
    print(json.dumps(outcome | {"report": str(report)}, indent=2, default=str))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from alignment_pipelines.promotion import rollback_champion

    try:
        moved = rollback_champion(_registry(args), _actor(args), args.reason)
    except ValueError as error:
        raise SystemExit(f"alignment-pipelines rollback: {error}") from None
    print(json.dumps(moved, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from alignment_pipelines.models.registry import export_model
    from alignment_pipelines.promotion import ALIGNED_MODEL, registered_model_folder

    folder = registered_model_folder(_registry(args), args.alias)
    target = export_model(folder, args.dir)
    print(json.dumps({"model": f"models:/{ALIGNED_MODEL}@{args.alias}", "folder": folder, "exported": str(target)}))
    return 0


def _where(args: argparse.Namespace) -> int:
    """Paths of the data-root layout, so scripts and the Makefile never spell them out again."""
    layout = DataRoot(default_data_root())
    print({"root": layout.root, "inbox": layout.inbox, "models": layout.model_store,
           "mlflow-uri": layout.tracking_uri}[args.what])
    return 0


def _demo(args: argparse.Namespace) -> int:
    from alignment_pipelines.runs import run_demo

    summary = run_demo(base_model=args.model)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _methods() -> dict:
    from alignment_pipelines.methods import METHODS

    return METHODS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignment-pipelines",
        description="Turn feedback on a language model's answers into an aligned, registered model.")
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser(
        "validate", help="check a feedback file; print a JSON summary; write accepted and quarantined rows",
        description="Validate a feedback file row by row. Prints {rows, accepted, quarantined, by_reason} "
                    "and writes FILE.accepted.jsonl and FILE.quarantine.jsonl (each quarantined row with "
                    "its line number and reason) beside the file or in --output-dir.")
    validate.add_argument("file")
    validate.add_argument("--output-dir", help="where to write the accepted and quarantined rows")
    validate.set_defaults(func=_validate)

    submit = commands.add_parser(
        "submit", help="register a feedback file from a path: copy it into the inbox for the sensor",
        description="Copy FILE into the feedback inbox (as .part, then renamed, so it is never read half "
                    "written). The inbox sensor registers it as a batch named by file name + content hash.")
    submit.add_argument("file")
    submit.add_argument("--inbox", help="default: <data root>/inbox")
    submit.set_defaults(func=_submit)

    train = commands.add_parser(
        "train", help="train one method and write a model folder plus metrics.json",
        description="Train METHOD from --model on --data and write the trained model (a LoRA adapter, or full "
                    "safetensors weights) and metrics.json to --output. Every field of the method's config is a "
                    "flag; `train METHOD --help` lists them with their defaults. --model takes a local folder, a "
                    ".gguf file, `smollm2-135m-instruct` (the embedded default) or `tiny-random` (a tiny offline "
                    "model for smoke tests). --config takes a JSON file of the method's config; flags override it.")
    methods = train.add_subparsers(dest="method", required=True, metavar="METHOD")
    for spec in _methods().values():
        method = methods.add_parser(spec.name, help=spec.description, description=spec.description)
        spec.config_cls.add_arguments(method)
        method.add_argument("--config", help="JSON file with the method's config; flags override it")
        method.add_argument("--config-json", metavar="JSON",
                            help="the method's config as JSON text, as the launchers pass it; its relative paths are "
                                 "relative to the data root (ALIGNMENT_PIPELINES_HOME); flags override it")
        method.add_argument("--model-store", help="where named models are converted to (default: <data root>/models)")
        method.add_argument("--allow-hub", action="store_true", help="allow downloading a hub model named by --model")
        method.set_defaults(func=_train)

    promote = commands.add_parser(
        "promote", help="run the promotion gate on the newest evaluation and move `champion` if a candidate passes",
        description="Read the newest evaluation report (or --report), run the challenger-against-champion gate and, "
                    "when a candidate passes, point `champion` of aligned_policy at it, recording who, why and the "
                    "evidence on the version. The same step as the `promote` job.")
    promote.add_argument("--report", help="an evaluation.json (default: the newest under the data root)")
    for f in fields(GateConfig):
        promote.add_argument(f"--{f.name.replace('_', '-')}", type=float, default=f.default,
                             help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"))
    promote.add_argument("--readmit-rolled-back", action="store_true",
                         help="let the gate pick a model that was rolled back (refused otherwise)")
    promote.add_argument("--no-incumbent", action="store_true",
                         help="while there is no champion, do not seat the baseline when no candidate beats it")
    rollback = commands.add_parser(
        "rollback", help="give `champion` back to the version that held it before",
        description="Restore the previous champion of aligned_policy; the demoted version records who and why.")
    rollback.add_argument("--reason", default="manual rollback", help="why, recorded on the demoted version")
    export = commands.add_parser(
        "export", help="write a registered model as one merged safetensors folder for serving",
        description="Write aligned_policy@ALIAS as a plain safetensors folder with its tokenizer and chat template "
                    "(a LoRA adapter merged into its start model), ready for `vllm serve DIR` or transformers.")
    export.add_argument("--alias", default="champion")
    export.add_argument("dir")
    for command, func in ((promote, _promote), (rollback, _rollback), (export, _export)):
        if command is not export:
            command.add_argument("--actor", help="who, recorded on the version (default: cli:<login name>)")
        command.add_argument("--tracking-uri",
                             help="default: MLFLOW_TRACKING_URI, else the SQLite store under the data root")
        command.set_defaults(func=func)

    where = commands.add_parser("where", help="print a path of the data-root layout",
                                description="Print where the data root keeps a thing (ALIGNMENT_PIPELINES_HOME).")
    where.add_argument("what", choices=["root", "inbox", "models", "mlflow-uri"])
    where.set_defaults(func=_where)

    demo = commands.add_parser(
        "demo", help="materialize the whole asset graph on the demo feedback (into DAGSTER_HOME)",
        description="Drop the demo feedback in the inbox, run the inbox sensor, and materialize every "
                    "asset in the Dagster instance at DAGSTER_HOME, so the UI shows them materialized.")
    demo.add_argument("--model", default=None, help="base model spec (default: smollm2-135m-instruct)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
