"""The feedback flywheel's domain: served answers (MLflow traces) and the feedback on them become feedback batches,
and each new batch scores the champion. No Dagster here (``assets/flywheel.py`` wires it).

Feedback in: ``serving.py`` tags every trace it records (``SERVED_TAG``, the model's name and version); a person or
an application logs feedback on a trace with ``mlflow.log_feedback`` (or the server's ``/v1/feedback``) under one of
two names: ``thumbs`` (True = thumbs up) becomes a binary row (prompt, completion = the served answer, label), and
``preferred_answer`` (a better answer: a correction, or another served answer to the same conversation) becomes a
pairwise row (chosen = the preferred answer, rejected = the served one). Each row also carries the trace id, the
model version that answered, the feedback's source and its time, and the assessment it came from.

Exactly once: :func:`collect_feedback` reads only assessments the cursor has not seen (``FeedbackCursor``: the
newest update time taken, and the assessments taken within ``OVERLAP_MS`` before it, so feedback stored a little
late is still taken once). Edited feedback: an assessment edited in place (a newer update time) or overridden by a
new one (``mlflow.override_feedback``) is new feedback: its current value goes into the next batch, with the
assessment it replaces in ``supersedes``; the earlier row stays in its batch, because batches are immutable.
Feedback overridden before it was collected is never emitted (only valid assessments are).

Watch out: :func:`score_batch` measures the champion on one validated batch: on pairs, how often its implicit
reward (log-probability ratio to the model it was trained from) prefers the chosen answer; on binary rows, the
share of thumbs up; each with a 95% Wilson interval.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

SERVED_TAG = "alignment_pipelines.served"  # "true" on every trace the serving endpoint recorded
MODEL_NAME_TAG = "alignment_pipelines.model_name"
MODEL_VERSION_TAG = "alignment_pipelines.model_version"
MODEL_SOURCE_TAG = "alignment_pipelines.model_source"  # the version the served one was promoted from
FEEDBACK_FILE_TAG = "alignment_pipelines.feedback_file"  # the inbox file its feedback went into (batch key's stem)
THUMBS_FEEDBACK = "thumbs"
PREFERRED_FEEDBACK = "preferred_answer"
FEEDBACK_NAMES = (THUMBS_FEEDBACK, PREFERRED_FEEDBACK)
BATCH_PREFIX = "traces-"  # inbox files the flywheel writes: traces-<kind>-<time>-<digest>.jsonl
OVERLAP_MS = 5 * 60 * 1000  # feedback stored up to this late (behind newer feedback) is still collected
FEEDBACK_WINDOW_DAYS = 30.0  # feedback on answers served longer ago than this is not looked for
PROVENANCE = ("trace_id", "model_name", "model_version", "source", "timestamp", "assessment_id", "supersedes")


@dataclass
class FeedbackCursor:
    """How far collection got: the newest assessment update time taken (ms) and the ``id@update_ms`` of those
    taken within ``OVERLAP_MS`` before it."""

    after_ms: int = 0
    seen: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> "FeedbackCursor":
        return cls(**json.loads(text)) if text else cls()


@dataclass(frozen=True)
class FeedbackRow:
    kind: str  # "binary" or "pairwise"
    record: dict  # the batch file's row: the kind's columns plus PROVENANCE
    updated_ms: int
    key: str  # id@update_ms


def _updated_ms(assessment) -> int:
    return int(assessment.last_update_time_ms or assessment.create_time_ms)


def _key(assessment) -> str:
    return f"{assessment.assessment_id}@{_updated_ms(assessment)}"


def _source(assessment) -> str:
    source = assessment.source
    return f"{source.source_type}:{source.source_id}" if source else "unknown"


def served_exchange(trace) -> tuple[list[dict], str] | None:
    """The conversation and the answer a served trace recorded (its root span's inputs and outputs), or None."""
    span = trace.data.spans[0] if trace.data.spans else None
    try:
        messages, answer = span.inputs["messages"], span.outputs["choices"][0]["message"]["content"]
    except (AttributeError, KeyError, IndexError, TypeError):
        return None
    return (messages, answer) if messages and isinstance(answer, str) else None


def _row(trace, assessment) -> FeedbackRow | None:
    """The feedback row an assessment on a served trace makes, or None for another kind of assessment."""
    exchange = served_exchange(trace)
    if exchange is None:
        return None
    messages, answer = exchange
    tags = trace.info.tags
    updated = _updated_ms(assessment)
    provenance = {"trace_id": trace.info.trace_id, "model_name": tags.get(MODEL_NAME_TAG),
                  "model_version": tags.get(MODEL_VERSION_TAG), "source": _source(assessment),
                  "timestamp": datetime.fromtimestamp(updated / 1000, timezone.utc).isoformat(),
                  "assessment_id": assessment.assessment_id, "supersedes": assessment.overrides}
    value = getattr(assessment, "value", None)
    if assessment.name == THUMBS_FEEDBACK and isinstance(value, bool):
        kind, record = "binary", {"prompt": messages, "completion": answer, "label": value}
    elif assessment.name == PREFERRED_FEEDBACK and isinstance(value, str) and value.strip():
        kind, record = "pairwise", {"prompt": messages, "chosen": value, "rejected": answer}
    else:
        return None
    return FeedbackRow(kind, record | provenance, updated, _key(assessment))


def collect_feedback(client, experiment_id: str, cursor: FeedbackCursor, now_ms: int | None = None,
                     window_days: float = FEEDBACK_WINDOW_DAYS) -> tuple[list[FeedbackRow], FeedbackCursor]:
    """The feedback on served traces that ``cursor`` has not seen, oldest first, and the cursor past it. Reads the
    served traces of the last ``window_days`` with their assessments, a page at a time, and the spans (the
    conversation and the answer) of those with new feedback only."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    since = now_ms - int(window_days * 86_400_000)
    query = f"tags.`{SERVED_TAG}` = 'true' AND timestamp_ms > {since}"
    seen = set(cursor.seen)
    rows: list[FeedbackRow] = []
    token = None
    while True:  # trace infos carry the assessments; the spans are read only for traces with new feedback
        page = client.search_traces(experiment_ids=[experiment_id], filter_string=query, max_results=100,
                                    page_token=token, include_spans=False)
        for found in page:
            fresh = [a for a in found.info.assessments or []
                     if a.valid is not False and a.name in FEEDBACK_NAMES and getattr(a, "feedback", None) is not None
                     and _key(a) not in seen and _updated_ms(a) >= cursor.after_ms - OVERLAP_MS]
            if fresh:
                trace = client.get_trace(found.info.trace_id)
                rows.extend(row for assessment in fresh if (row := _row(trace, assessment)) is not None)
        token = page.token
        if not token:
            break
    rows.sort(key=lambda r: (r.updated_ms, r.key))
    after = max([cursor.after_ms, *(r.updated_ms for r in rows)])
    kept = [key for key in [*cursor.seen, *(r.key for r in rows)] if int(key.rpartition("@")[2]) >= after - OVERLAP_MS]
    return rows, FeedbackCursor(after_ms=after, seen=kept)


def write_feedback_batches(inbox: Path, rows: Sequence[FeedbackRow]) -> dict[Path, list[str]]:
    """One JSONL file per kind of feedback in ``inbox`` (a batch holds one kind), written under a ``.part`` name and
    renamed when complete, so the inbox sensor never reads half a file; each file with the trace ids it holds.
    Named by kind, the newest feedback's time and the content: the same rows written twice are the same file."""
    inbox.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind in ("binary", "pairwise"):
        chosen = [row for row in rows if row.kind == kind]
        if not chosen:
            continue
        text = "".join(json.dumps(row.record, ensure_ascii=False, sort_keys=True) + "\n" for row in chosen)
        newest = datetime.fromtimestamp(max(row.updated_ms for row in chosen) / 1000, timezone.utc)
        path = inbox / (f"{BATCH_PREFIX}{kind}-{newest.strftime('%Y%m%dT%H%M%S')}-"
                        f"{hashlib.sha256(text.encode()).hexdigest()[:8]}.jsonl")
        partial = path.with_name(path.name + ".part")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
        written[path] = sorted({row.record["trace_id"] for row in chosen})
    return written


# ---- the champion watched on each batch ---------------------------------------------------------------------------

@dataclass(frozen=True)
class WatchScore:
    """The champion on one batch: ``rate`` with its 95% interval over ``n`` rows; ``measure`` says what was
    counted ("agreement": its implicit reward prefers the chosen answer; "thumbs_up": the share of thumbs up)."""

    measure: str
    rate: float
    ci_low: float
    ci_high: float
    n: int
    successes: int
    reference: str | None = None  # what the implicit reward was measured against

    def to_dict(self) -> dict:
        return asdict(self)


def score_rate(measure: str, successes: int, n: int, reference: str | None = None) -> WatchScore:
    from alignment_pipelines.evaluation.stats import wilson_interval

    low, high = wilson_interval(successes, n)
    return WatchScore(measure, successes / n if n else float("nan"), low, high, n, successes, reference)


def score_batch(kind: str, accepted, champion_folder: str | Path | None, reference_folder: str | Path | None,
                max_rows: int = 512, beta: float = 0.1) -> WatchScore | None:
    """The champion on a validated batch's accepted rows (a DataFrame): agreement on pairs, thumbs-up share on
    binary rows, None for prompts. Agreement reads at most ``max_rows`` pairs (the first ones). Without a
    reference (the champion records no start model) the implicit reward is its log-probability alone."""
    if kind == "binary":
        labels = [bool(label) for label in accepted["label"]]
        return score_rate("thumbs_up", sum(labels), len(labels))
    if kind != "pairwise":
        return None
    from alignment_pipelines.evaluation.metrics import implicit_reward_metrics, pair_logprobs
    from alignment_pipelines.models.loading import load_causal_lm

    pairs = accepted.head(max_rows)
    if pairs.empty:
        return score_rate("agreement", 0, 0)
    logps = []
    for folder in (champion_folder, reference_folder):
        if folder is None:
            logps.append(([0.0] * len(pairs), [0.0] * len(pairs)))
            continue
        model, tokenizer = load_causal_lm(folder)
        logps.append(pair_logprobs(model, tokenizer, pairs))
        del model
    (pol_c, pol_r), (ref_c, ref_r) = logps
    accuracy = implicit_reward_metrics(pol_c, pol_r, ref_c, ref_r, beta)["preference_accuracy"]
    return score_rate("agreement", round(accuracy * len(pairs)), len(pairs),
                      str(reference_folder) if reference_folder else "none (log-probability alone)")


def dropped(score: WatchScore, expected: float, tolerance: float) -> bool:
    """A drop the batch's own noise cannot explain: the whole 95% interval lies more than ``tolerance`` below
    ``expected``."""
    return score.n > 0 and score.ci_high < expected - tolerance


def trend_plot(history: Sequence[dict], title: str = "The champion on each batch (95% intervals)") -> bytes:
    """PNG: one line per measure over the batches in order (``history``: dicts of ``batch`` plus a ``WatchScore``'s
    fields), each point with its interval as an error bar."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.0), dpi=80, layout="constrained")
    ax = fig.add_subplot()
    for measure in sorted({entry["measure"] for entry in history}):
        points = [(i, e) for i, e in enumerate(history) if e["measure"] == measure and e["n"]]
        ax.errorbar([i for i, _ in points], [e["rate"] for _, e in points], capsize=3, marker="o", label=measure,
                    yerr=[[e["rate"] - e["ci_low"] for _, e in points], [e["ci_high"] - e["rate"] for _, e in points]])
    ax.set_xticks(range(len(history)), [entry["batch"][:18] for entry in history], rotation=30, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate")
    ax.set_title(title)
    if history:
        ax.legend(fontsize=8)
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()
