"""`alignment-pipelines`: the same code the assets run, for users, scripts and GPU workers."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from alignment_pipelines.layout import DataRoot, default_data_root
from alignment_pipelines.progress import progress_wanted
from alignment_pipelines.promotion import GateConfig
from alignment_pipelines.serving import add_serve_command
from alignment_pipelines.tracking import WORKER_MLFLOW_RUN_ENV, WORKER_MLFLOW_URI_ENV, Tracker, step_callback


class UsageError(Exception):
    """A command line asking for something that cannot be: exit 2, as argparse's own errors."""


class CommandFailed(Exception):
    """Work that could not be done for a reason the user can act on: exit 1."""


def _bars_wanted() -> bool:
    """Progress bars for a person at a terminal outside CI (`progress_wanted`), never for a run under Pipes."""
    return progress_wanted() and not os.environ.get("DAGSTER_PIPES_CONTEXT")


def _progress_bar(description: str, unit: str, shown: bool = True):
    """A bar on stderr where `_bars_wanted` (and ``shown``); elsewhere a disabled one, whose updates draw nothing."""
    from tqdm import tqdm

    return tqdm(desc=description, unit=unit, unit_scale=True, file=sys.stderr,
                disable=not (shown and _bars_wanted()))


def _rules(args: argparse.Namespace):
    """The validation rules of the flags, as the asset's ValidationConfig sets them."""
    from alignment_pipelines.data.validate.rules import ValidationRules

    return ValidationRules(tokenizer=args.tokenizer, pii=args.pii, max_prompt_tokens=args.max_prompt_tokens,
                           max_completion_tokens=args.max_completion_tokens,
                           quarantine_over_length=args.quarantine_over_length,
                           max_quarantine_fraction=args.max_quarantine_fraction)


def _validate(args: argparse.Namespace) -> int:
    """The asset's engine and gate on one file: accepted and quarantined rows streamed to Parquet (or JSON Lines),
    the summary with the gate's verdict on stdout; exit 3 when the gate would block the batch."""
    import tempfile

    from alignment_pipelines.data.validate.engine import validate_file_to_parquet
    from alignment_pipelines.data.validate.gate import run_expectation_suite_on_file
    from alignment_pipelines.data.validate.rules import defect_count

    source = Path(args.file)
    if not 0 <= args.max_quarantine_fraction <= 1:
        raise UsageError(f"--max-quarantine-fraction {args.max_quarantine_fraction}: must be between 0 and 1")
    if args.tokenizer and not Path(args.tokenizer).exists():
        raise UsageError(f"--tokenizer {args.tokenizer}: no such tokenizer folder or tokenizer.json")
    if not args.output_dir and source.parent.resolve() == DataRoot(default_data_root()).inbox.resolve():
        raise UsageError(f"{source} is in the inbox, where outputs written beside it would be ingested as new "
                         "batches: give --output-dir")
    rules = _rules(args)
    out_dir = Path(args.output_dir) if args.output_dir else source.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = {side: out_dir / f"{source.name}.{side}.{args.format}" for side in ("accepted", "quarantine")}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{source.name}.") as scratch:
        scratch = Path(scratch)
        parquet = {side: (targets[side] if args.format == "parquet" else scratch / f"{side}.parquet")
                   for side in targets}
        with _progress_bar(f"validating {source.name}", "rows") as bar:
            summary = validate_file_to_parquet(source, parquet["accepted"], parquet["quarantine"], rules,
                                               layout=args.layout, chunk_rows=args.chunk_rows,
                                               keys_path=scratch / "keys.parquet", on_chunk=bar.update)
        report = run_expectation_suite_on_file(parquet["accepted"], rules,
                                               quarantined_count=defect_count(summary["by_reason"]),
                                               keys_path=scratch / "keys.parquet")
        if args.format == "jsonl":
            for side in targets:
                _parquet_to_jsonl(parquet[side], targets[side], accepted=side == "accepted")
    summary["gate"] = {"passed": report.success, "max_quarantine_fraction": rules.max_quarantine_fraction,
                       "quarantine_fraction": summary["suite"]["quarantine_fraction"],
                       "failed": [{"expectation": r["expectation"], "column": r["column"], "reason": str(r["reason"]),
                                   "unexpected_count": r["unexpected_count"]} for r in report.failed]}
    summary["outputs"] = {side: str(path) for side, path in targets.items()}
    for key in ("suite", "suite_success", "chunk_rows"):  # the gate above is the verdict; these were its inputs
        summary.pop(key, None)
    print(json.dumps(summary, indent=2, default=str))
    if not report.success:
        print(f"alignment-pipelines validate: {source}: the gate blocks this batch "
              f"({', '.join(r['expectation'] for r in report.failed)})", file=sys.stderr)
        return BLOCKED
    return 0


def _parquet_to_jsonl(parquet: Path, target: Path, accepted: bool) -> None:
    """One JSON object a row, a record batch at a time: accepted rows as `records_jsonl` writes them (a prompt as
    its list of messages), quarantined rows with their columns. The engine writes Parquet only: the gate reads the
    accepted rows from it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignment_pipelines.data.records import records_jsonl

    partial = target.with_name(target.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        for batch in pq.ParquetFile(parquet).iter_batches(batch_size=50_000):
            out.writelines(records_jsonl(pa.Table.from_batches([batch])) if accepted else
                           (json.dumps(row, ensure_ascii=False) + "\n" for row in batch.to_pylist()))
    os.replace(partial, target)


def _submit(args: argparse.Namespace) -> int:
    """Copy a file into the inbox atomically: written under a hidden `.part` name (hashed as it is written),
    then linked to its name, which fails if the name is taken: the sensor never sees half a file, and a
    file already in the inbox (perhaps a batch not yet copied) is never overwritten."""
    import shutil
    import tempfile

    from alignment_pipelines.data.ingest.inbox import ContentHash, batch_key

    source = Path(args.file)
    if not source.is_file():
        raise CommandFailed(f"{source} is not a file")
    inbox = Path(args.inbox) if args.inbox else DataRoot(default_data_root()).inbox
    inbox.mkdir(parents=True, exist_ok=True)
    target = inbox / source.name
    refusal = f"{target} already exists; a batch is immutable, so submit new content under another name"
    if os.path.lexists(target):
        raise CommandFailed(refusal)
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
            raise CommandFailed(refusal) from None
        finally:
            os.unlink(partial.name)
    print(json.dumps({"inbox_file": str(target), "batch_key": batch_key(target, digest.hexdigest())}))
    return 0


def _training_data(path: str, work_dir: Path) -> str:
    """Parquet passes through; any other feedback file goes through the assets' streaming validation (default
    rules), and its accepted rows (Parquet) are what trains."""
    if path.endswith(".parquet"):
        return path
    from alignment_pipelines.data.validate.engine import validate_file_to_parquet
    from alignment_pipelines.launch import is_main_process, process_rank

    rank = f".rank{process_rank()}" if process_rank() else ""  # ranks of one run never write the same file
    stem = work_dir / f"{Path(path).name}{rank}"
    with _progress_bar(f"validating {Path(path).name}", "rows", shown=is_main_process()) as bar:
        summary = validate_file_to_parquet(path, f"{stem}.accepted.parquet", f"{stem}.quarantine.parquet",
                                           on_chunk=bar.update)
    if summary["quarantined"] and is_main_process():
        print(f"{path}: {summary['quarantined']} of {summary['rows']} rows quarantined {summary['by_reason']} "
              f"(listed in {stem}.quarantine.parquet); training on the {summary['accepted']} accepted rows",
              file=sys.stderr)
    return f"{stem}.accepted.parquet"


def _train(args: argparse.Namespace) -> int:
    """Train one method. Under ``accelerate launch`` every rank runs this; only rank 0 reports (Pipes, MLflow) and
    prints the result. ``--config-json`` is the config as data, as the launchers pass it: its relative paths are
    relative to the data root (``ALIGNMENT_PIPELINES_HOME``); a ``--config`` file's are relative to the cwd."""
    from alignment_pipelines.launch import check_multi_process, is_main_process, resolve_from_root, world_size
    from alignment_pipelines.methods import config_from_dict, get_method, run_training
    from alignment_pipelines.models.loading import resolve_model

    spec = get_method(args.method)
    try:
        if args.config_json:
            values = resolve_from_root(json.loads(args.config_json), spec.config_cls, default_data_root())
        else:
            values = json.loads(Path(args.config).read_text()) if args.config else {}
    except json.JSONDecodeError as error:
        raise UsageError(f"{args.method}: --config{'-json' if args.config_json else ''} is not JSON: {error}") from None
    values.update(spec.config_cls.values_from_args(args))
    for needed in ("model", "data", "output_dir"):
        if not values.get(needed):
            raise UsageError(f"{args.method}: --{needed.replace('_', '-')} is required "
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
    if main and "disable_tqdm" not in values and _bars_wanted():
        values["disable_tqdm"] = False  # a person at a terminal sees the steps go by
    with _WorkerReporting(report=main) as report:  # opened first: validation's warnings (a vLLM fallback) reach it
        config = config_from_dict(args.method, values)
        report.start(args.method, config)
        if world_size() > 1:
            check_multi_process(spec, config)
        if main and config.num_processes != world_size():
            logging.getLogger("alignment_pipelines.launch").warning(
                "num_processes=%d, but %d process(es) are training: the launchers start the worker under "
                "`accelerate launch --multi_gpu --num_processes N -m alignment_pipelines.cli train ...`; run it so "
                "by hand for several", config.num_processes, world_size())
        piped = report.pipes is not None
        # the trainer's log lines to stderr: stdout is for the result's JSON (through Pipes it stays as Pipes set it)
        with contextlib.nullcontext() if piped else contextlib.redirect_stdout(sys.stderr):
            result = run_training(args.method, config, callbacks=report.callbacks())
        report.finish(result)
    if main and not piped:  # through Pipes the result is a message to the run, not text for the console
        print(result.to_json())
    return 0


def _model_fields(config_cls) -> list[str]:
    """Fields that name a model: the start model and any other model the method loads (a reward model)."""
    return [f.name for f, _ in config_cls.field_specs() if f.metadata.get("kind") == "model"]


class _WorkerReporting:
    """Streams step metrics to Dagster (when run through Pipes) and MLflow (the asset's run when it passes one; else,
    with MLFLOW_TRACKING_URI set, a run of this command's own, with the config as params and the final metrics), and
    forwards the warnings of ``alignment_pipelines`` loggers (a generation-backend fallback) to the Dagster run.
    ``report`` False (a rank other than 0): nothing is opened, no callback is added."""

    def __init__(self, report: bool = True):
        self.report = report

    def __enter__(self):
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
        self.own_run = not self.mlflow_run_id and not self.pipes and bool(os.environ.get("MLFLOW_TRACKING_URI"))
        return self

    def start(self, method: str, config) -> None:
        """A run of its own for a training started by hand, when MLFLOW_TRACKING_URI names a tracking server."""
        if not self.report or not self.own_run:
            return
        self.tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
        self.mlflow_run_id = self.tracker.start_run(f"cli-{method}", tags={"alignment_pipelines.source": "cli"})
        self.tracker.log_params(self.mlflow_run_id, config.to_dict() | {"method": method})

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
        if self.own_run and self.tracker:
            self.tracker.log_metrics(self.mlflow_run_id, result.metrics, step=int(result.metrics.get("steps", 0)))
            self.tracker.end_run(self.mlflow_run_id, succeeded=True)
            self.own_run = False

    def __exit__(self, *exc):
        if self.own_run and self.tracker:  # the training failed: its run says so
            self.tracker.end_run(self.mlflow_run_id, succeeded=False)
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


def _tracking_uri(args: argparse.Namespace) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the data root's SQLite store."""
    return args.tracking_uri or DataRoot(default_data_root()).ensure().tracking_uri


def _registry(args: argparse.Namespace):
    from mlflow import MlflowClient

    uri = _tracking_uri(args)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # a new store's table creation: not news
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _actor(args: argparse.Namespace) -> str:
    import getpass

    return args.actor or f"cli:{getpass.getuser()}"


def _promote(args: argparse.Namespace) -> int:
    """The gate on the newest evaluation (or --report), as the `promote` job runs it."""
    from alignment_pipelines.evaluation.report import newest_report
    from alignment_pipelines.evaluation.schema import EvaluationReport
    from alignment_pipelines.promotion import promote_from_report

    try:
        gate = GateConfig(**{f.name: getattr(args, f.name) for f in fields(GateConfig)})
    except ValueError as error:  # a rate out of [0, 1]: the flag's fault
        raise UsageError(str(error).replace("GateConfig.", "--").replace("_", "-")) from None
    every_evaluation = DataRoot(default_data_root()).training_dir("evaluation_report", "*").parent
    report = Path(args.report) if args.report else newest_report(every_evaluation)
    if report is None or not report.is_file():
        raise CommandFailed("no evaluation report found; run the evaluation first "
                         "or give --report")
    evaluation = EvaluationReport.read(report)  # first: a report this code cannot read touches no registry
    outcome = promote_from_report(_registry(args), evaluation, _actor(args), gate,  # refusals: one line, exit 1
                                  readmit_rolled_back=args.readmit_rolled_back, seat_baseline=not args.no_incumbent)
    print(json.dumps(outcome | {"report": str(report)}, indent=2, default=str))
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from alignment_pipelines.promotion import rollback_champion

    try:
        moved = rollback_champion(_registry(args), _actor(args), args.reason)
    except ValueError as error:
        raise CommandFailed(str(error)) from None
    print(json.dumps(moved, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    from alignment_pipelines.models.registry import export_model
    from alignment_pipelines.promotion import ALIGNED_MODEL, registered_model_folder

    from mlflow.exceptions import MlflowException

    try:
        folder = registered_model_folder(_registry(args), args.alias)
    except MlflowException as error:
        raise CommandFailed(f"no {ALIGNED_MODEL}@{args.alias} in the registry ({error.message}); "
                            "promote a model first") from None
    target = export_model(folder, args.dir)
    print(json.dumps({"model": f"models:/{ALIGNED_MODEL}@{args.alias}", "folder": folder, "exported": str(target)}))
    return 0


def _model_under_test(name: str, spec: str, client, tracking_uri: str):
    """(ModelRef, ModelUnderTest) of a model folder or a registered version (``models:/name/3``, ``models:/name@a``):
    the folder, the start model its card names (the reference for implicit reward and KL), the reward models its
    training optimised (its registry tags and saved config), as the evaluation asset reads them, and, registered,
    the run that trained it (its training curve)."""
    from alignment_pipelines.evaluation.compare import ModelUnderTest
    from alignment_pipelines.evaluation.schema import optimisation_targets
    from alignment_pipelines.models.loading import read_model_card
    from alignment_pipelines.models.registry import fetch_model, parse_models_uri
    from alignment_pipelines.refs import ModelRef

    registered, tags, run_id = (None, None), {}, None
    if spec.startswith("models:/"):
        try:
            registered_name, version, alias = parse_models_uri(spec)
        except ValueError as error:
            raise UsageError(str(error)) from None
        entry = (client.get_model_version_by_alias(registered_name, alias) if alias
                 else client.get_model_version(registered_name, version))
        registered, tags, run_id = (registered_name, str(entry.version)), dict(entry.tags), entry.run_id
    folder = fetch_model(spec, tracking_uri)
    if not folder.is_dir():
        raise UsageError(f"{name}: {spec} is not a model folder or a models:/ URI")
    card = read_model_card(folder)
    ref = ModelRef(path=str(folder), method=card.get("method", "unknown"), base_model=card.get("parent", str(folder)),
                   role=card.get("role", "policy"), start_path=card.get("parent"), registered_name=registered[0],
                   registered_version=registered[1], mlflow_run_id=run_id)
    return ref, ModelUnderTest(name, str(folder), ref.start_path, optimisation_targets(str(folder), tags))


def _named_models(specs: list[str]) -> dict[str, str]:
    """NAME=MODEL pairs; a bare MODEL is named by its folder or registered name and version."""
    named = {}
    for spec in specs:
        name, _, model = spec.partition("=") if "=" in spec.split("models:/")[0] else ("", "", spec)
        name = name or (model[len("models:/"):].replace("/", "-").replace("@", "-") if model.startswith("models:/")
                        else Path(model).name)
        if name in named:
            raise UsageError(f"two models named {name!r}: give them names (NAME=MODEL)")
        named[name] = model
    return named


def _evaluate(args: argparse.Namespace) -> int:
    """The evaluation asset's measurement on models given by hand: every model against the baseline on the same
    held-out pairs and prompts, judged in both orders; the same report (report.md, plots, evaluation.json)."""
    import tempfile

    from alignment_pipelines.data.records import head_records
    from alignment_pipelines.evaluation.compare import evaluate_models
    from alignment_pipelines.evaluation.judge_choice import evaluation_judge
    from alignment_pipelines.evaluation.report import (REPORT_FILE, build_report, comparison_table,
                                                       training_history, write_report)
    from alignment_pipelines.evaluation.schema import Evidence
    from alignment_pipelines.judges.factory import build_judge, judge_spec_from_environment
    from alignment_pipelines.models.registry import fetch_model

    tracking_uri, client = _tracking_uri(args), _registry(args)
    named = {"baseline": args.baseline} | _named_models(args.models)
    refs, models = {}, []
    for name, spec in named.items():
        refs[name], model = _model_under_test(name, spec, client, tracking_uri)
        models.append(model)
    judge_model = _model_under_test("--judge-model", args.judge_model, client, tracking_uri)[0] \
        if args.judge_model else None
    judge, identity, _ = evaluation_judge("explicit" if judge_model else "resource", judge_model,
                                          lambda: build_judge(judge_spec_from_environment()), args.batch_size)
    out = Path(args.output_dir)
    with tempfile.TemporaryDirectory(prefix="alignment-pipelines-evaluate-") as work:
        pairs_file = _training_data(args.data, Path(work))  # a feedback file through the assets' validation
        pairs = head_records(pairs_file, args.max_pairs, columns=["prompt", "chosen", "rejected"])
    reward_model = fetch_model(args.reward_model, tracking_uri) if args.reward_model else None
    with _progress_bar("evaluating", "step") as bar:
        def advance(done: int, total: int, what: str) -> None:
            bar.total = total
            bar.set_postfix_str(what, refresh=False)
            bar.update(done - bar.n)

        evaluation = evaluate_models(models, "baseline", pairs, list(pairs["prompt"].head(args.max_prompts)), judge,
                                     reward_model_path=str(reward_model) if reward_model else None,
                                     max_new_tokens=args.max_new_tokens, beta=args.beta, batch_size=args.batch_size,
                                     judge_identity=identity, progress=advance)
    write_report(out, evaluation, {name: training_history(client, ref.mlflow_run_id) for name, ref in refs.items()},
                 notes=[f"Models: {', '.join(f'{n} = {s}' for n, s in named.items())}", f"Held-out data: {args.data}"])
    report = build_report(evaluation, models, {name: ref.to_dict() for name, ref in refs.items()},
                               Evidence(mlflow_run_id="", dagster_run_id="", path=str(out.resolve())),
                               candidates=[name for name in named if name != "baseline"],
                               training_reward_model=None if reward_model is None else {"uri": args.reward_model})
    (out / REPORT_FILE).write_text(report.to_json())
    print("\n".join([identity.headline(), "", comparison_table(evaluation), "",  # the plots stay in report.md
                      f"Report: {out / 'report.md'} (plots, samples); for `promote --report`: {out / REPORT_FILE}"]))
    return 0


def _where(args: argparse.Namespace) -> int:
    """Paths of the data-root layout, so scripts and the Makefile never spell them out again."""
    layout = DataRoot(default_data_root())
    print({"root": layout.root, "inbox": layout.inbox, "models": layout.model_store,
           "mlflow-uri": layout.tracking_uri}[args.what])
    return 0


def default_dagster_home() -> Path:
    """DAGSTER_HOME, set as the Makefile sets it (./.dagster_home, with the repository's dagster.yaml when run
    from its root) where it is not set, so `demo` works outside make and `make ui` shows what it ran."""
    import shutil

    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"])
    home = Path.cwd() / ".dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    if Path("dagster.yaml").is_file() and not (home / "dagster.yaml").exists():
        shutil.copyfile("dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    print(f"DAGSTER_HOME is not set: using {home}, as `make demo` does", file=sys.stderr)
    return home


def _demo(args: argparse.Namespace) -> int:
    from alignment_pipelines.runs import run_demo

    default_dagster_home()
    summary = run_demo(base_model=args.model)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _validation_defaults() -> dict:
    """ValidationRules' defaults: the flags default to what the asset applies."""
    from alignment_pipelines.data.validate.rules import ValidationRules

    return {f.name: f.default for f in fields(ValidationRules)}


def _methods() -> dict:
    from alignment_pipelines.methods import METHODS

    return METHODS


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``argv`` without ``train``: the methods (torch, TRL: seconds) are not imported."""
    parser = argparse.ArgumentParser(
        prog="alignment-pipelines",
        description="Turn feedback on a language model's answers into an aligned, registered model.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    debug = argparse.ArgumentParser(add_help=False)  # --debug after the command too; SUPPRESS keeps the one before
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser(
        "validate", parents=[debug],
        help="check a feedback file as the pipeline does; print a JSON summary with the gate's verdict",
        description="Validate a feedback file (JSONL, JSON, CSV/TSV or Parquet, gzipped or not) with the engine and "
                    "the gate of the `validated_feedback` asset, streaming in chunks. Writes FILE.accepted.parquet "
                    "and FILE.quarantine.parquet (each quarantined row with its line number and reason; "
                    "--format jsonl for JSON Lines) beside the file or in --output-dir, and prints {rows, accepted, "
                    "quarantined, by_reason, ..., gate}.",
        epilog=f"exit status: 0 the batch passes the gate, {BLOCKED} the gate would block it, 1 the file cannot be "
               "read, 2 a bad command line")
    validate.add_argument("file")
    validate.add_argument("--output-dir", help="where to write the accepted and quarantined rows")
    validate.add_argument("--format", choices=["parquet", "jsonl"], default="parquet",
                          help="of the accepted and quarantined rows (default: parquet)")
    validate.add_argument("--layout", help="the rows' layout (e.g. hh-rlhf, chat-log) instead of detecting it")
    rule_defaults = _validation_defaults()
    validate.add_argument("--pii", choices=["off", "redact", "quarantine"], default=rule_defaults["pii"],
                          help="e-mail addresses, phone and card numbers: leave, redact or quarantine the row "
                               "(default: %(default)s)")
    validate.add_argument("--tokenizer", help="a local tokenizer folder (or tokenizer.json): token-length "
                                              "statistics with it, as the asset measures with the base model's")
    validate.add_argument("--max-prompt-tokens", type=positive_int, default=rule_defaults["max_prompt_tokens"],
                          help="with --tokenizer (default: %(default)s)")
    validate.add_argument("--max-completion-tokens", type=positive_int, default=rule_defaults["max_completion_tokens"],
                          help="with --tokenizer (default: %(default)s)")
    validate.add_argument("--quarantine-over-length", action="store_true",
                          help="with --tokenizer: quarantine rows over the limits instead of counting them")
    validate.add_argument("--max-quarantine-fraction", type=float, default=rule_defaults["max_quarantine_fraction"],
                          help="the gate: more defective rows than this blocks the batch (default: %(default)s)")
    validate.add_argument("--chunk-rows", type=positive_int, default=50_000,
                          help="rows per chunk (default: %(default)s)")
    validate.set_defaults(func=_validate)

    submit = commands.add_parser(
        "submit", parents=[debug], help="register a feedback file from a path: copy it into the inbox for the sensor",
        description="Copy FILE into the feedback inbox (as .part, then renamed, so it is never read half "
                    "written). The inbox sensor registers it as a batch named by file name + content hash.")
    submit.add_argument("file")
    submit.add_argument("--inbox", help="default: <data root>/inbox")
    submit.set_defaults(func=_submit)

    train = commands.add_parser(
        "train", parents=[debug], help="train one method and write a model folder plus metrics.json",
        description="Train METHOD from --model on --data and write the trained model (a LoRA adapter, or full "
                    "safetensors weights) and metrics.json to --output. Every field of the method's config is a "
                    "flag; `train METHOD --help` lists them with their defaults. --model takes a local folder, a "
                    ".gguf file, `smollm2-135m-instruct` (the embedded default) or `tiny-random` (a tiny offline "
                    "model for smoke tests). --config takes a JSON file of the method's config; flags override it.")
    methods = train.add_subparsers(dest="method", required=True, metavar="METHOD")
    for spec in _methods().values() if argv is None or "train" in argv else ():
        method = methods.add_parser(spec.name, parents=[debug], help=spec.description, description=spec.description)
        spec.config_cls.add_arguments(method)
        method.add_argument("--config", help="JSON file with the method's config; flags override it")
        method.add_argument("--config-json", metavar="JSON",
                            help="the method's config as JSON text, as the launchers pass it; its relative paths are "
                                 "relative to the data root (ALIGNMENT_PIPELINES_HOME); flags override it")
        method.add_argument("--model-store", help="where named models are converted to (default: <data root>/models)")
        method.add_argument("--allow-hub", action="store_true", help="allow downloading a hub model named by --model")
        method.set_defaults(func=_train)

    promote = commands.add_parser(
        "promote", parents=[debug],
        help="run the promotion gate on the newest evaluation and move `champion` if a candidate passes",
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
        "rollback", parents=[debug], help="give `champion` back to the version that held it before",
        description="Restore the previous champion of aligned_policy; the demoted version records who and why.")
    rollback.add_argument("--reason", default="manual rollback", help="why, recorded on the demoted version")
    export = commands.add_parser(
        "export", parents=[debug], help="write a registered model as one merged safetensors folder for serving",
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

    evaluate = commands.add_parser(
        "evaluate", parents=[debug], help="evaluate model folders or registered versions against a baseline",
        description="Measure MODELs (folders or registered versions: models:/NAME/VERSION, models:/NAME@ALIAS; "
                    "NAME=MODEL to name one) and --baseline on the same held-out pairs and prompts of --data, as the "
                    "evaluation_report asset does: preference accuracy, implicit reward, KL to each model's start "
                    "model, answer lengths, broken answers, and win-rates against the baseline with 95%% intervals, "
                    "every pair judged in both orders. Prints the judge and the comparison table, and writes report.md "
                    "(with plots and samples) and evaluation.json (what `promote --report` reads) to --output-dir.")
    evaluate.add_argument("models", nargs="+", metavar="MODEL")
    evaluate.add_argument("--baseline", required=True, help="the model the others are judged against (the SFT "
                                                            "model in the pipeline)")
    evaluate.add_argument("--data", required=True, help="held-out preference pairs: a feedback file (validated as "
                                                        "`validate` does) or an accepted .parquet")
    evaluate.add_argument("--output-dir", default="evaluation", help="default: %(default)s")
    evaluate.add_argument("--judge-model", help="a reward model (folder or models:/ URI) that judges the win-rates; "
                                                "default: the deployment's judge (ALIGNMENT_PIPELINES_JUDGE, else the "
                                                "rule judge, a heuristic)")
    evaluate.add_argument("--reward-model", help="a training reward model that also scores every answer")
    for flag, default, text in (("--max-pairs", 64, "held-out pairs scored for preference accuracy"),
                                ("--max-prompts", 64, "held-out prompts every model answers"),
                                ("--max-new-tokens", 64, "tokens per answer"), ("--batch-size", 8, "per forward")):
        evaluate.add_argument(flag, type=positive_int, default=default, help=f"{text} (default: %(default)s)")
    evaluate.add_argument("--beta", type=float, default=0.1, help="scale of the implicit reward (default: %(default)s)")
    evaluate.add_argument("--tracking-uri", help="for models:/ URIs; default: MLFLOW_TRACKING_URI, else the SQLite "
                                                 "store under the data root")
    evaluate.set_defaults(func=_evaluate)

    add_serve_command(commands, parents=[debug])

    where = commands.add_parser("where", parents=[debug], help="print a path of the data-root layout",
                                description="Print where the data root keeps a thing (ALIGNMENT_PIPELINES_HOME).")
    where.add_argument("what", choices=["root", "inbox", "models", "mlflow-uri"])
    where.set_defaults(func=_where)

    demo = commands.add_parser(
        "demo", parents=[debug], help="materialize the whole asset graph on the demo feedback (into DAGSTER_HOME)",
        description="Drop the demo feedback in the inbox, run the inbox sensor, and materialize every "
                    "asset in the Dagster instance at DAGSTER_HOME, so the UI shows them materialized.")
    demo.add_argument("--model", default=None, help="base model spec (default: smollm2-135m-instruct)")
    demo.set_defaults(func=_demo)
    return parser


# Errors a user can cause, by class name (anywhere in the error's class hierarchy), and the exit status each gives:
# 2 for a command line that asks for something impossible, 1 for work that could not be done. Names, not classes,
# so that telling them apart imports nothing (MLflow, Dagster) on the way out.
EXIT_STATUS = {
    "UsageError": 2, "ModelSpecError": 2, "ConfigError": 2,
    "CommandFailed": 1, "FeedbackFileError": 1, "ModelFolderError": 1, "MlflowException": 1, "ReportSchemaError": 1,
    "PromotionRefused": 1, "DagsterHomeNotSetError": 1, "FileNotFoundError": 1, "IsADirectoryError": 1,
    "PermissionError": 1, "TrainingDiverged": 1,
}
BLOCKED = 3  # `validate`: the file was read, and the gate would block the batch


def exit_status(error: BaseException) -> int | None:
    """The exit status for an error a user can cause; None for a defect (shown with its traceback)."""
    for cls in type(error).__mro__:
        if cls.__name__ in EXIT_STATUS:
            return EXIT_STATUS[cls.__name__]
    return None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alignment-pipelines")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run one command. An expected error prints one line on stderr (its traceback only with --debug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not progress_wanted():  # no library's bars (model shards, tokenizing) in a pipe, a log file or CI either
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"alignment-pipelines {args.command}: interrupted", file=sys.stderr)
        return 130  # as a shell reports a command ended by Ctrl-C
    except Exception as error:
        status = exit_status(error)
        if status is None or args.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"alignment-pipelines {args.command}: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
