"""The AI-feedback store: every judgement an annotator made, kept as Parquet, none made twice.

Online methods ask an annotator about fresh pairs of answers; each judgement costs a model call (or
an API request), so it is kept. A judgement is keyed on (judge id, instruction, prompt, the two
answers as an unordered pair): asking about a pair already judged, in either order, reads the stored
verdict instead (flipped when the answers come in the other order).

The store is a folder of immutable part files. A batch is written only after the annotator judged
all of it (a :class:`~alignment_pipelines.judges.JudgeError` writes nothing), into a hidden file
renamed into place, so a reader never sees half a batch. The store is kept apart from the human
feedback (its own folder, its own asset) and nothing trains on it unless configured to
(:func:`preference_pairs` exports it in the pairs format).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from alignment_pipelines.data.schemas import normalize_prompt
from alignment_pipelines.judges.base import Judge, Verdict

PART_GLOB = "part-*.parquet"
COLUMNS = ("key", "judge_id", "instruction", "prompt", "answer_a", "answer_b", "preferred", "confidence",
           "first_order", "second_order", "raw_first", "raw_second", "policy_version", "judged_at")


def prompt_json(prompt) -> str:
    """The prompt as canonical JSON chat messages: one spelling per conversation, for keys and Parquet."""
    return json.dumps(normalize_prompt(prompt), sort_keys=True, ensure_ascii=False)


def judgement_key(judge_id: str, instruction: str, prompt, answer_a: str, answer_b: str) -> str:
    """Identity of a judgement; the answers are an unordered pair, since each is judged in both orders."""
    low, high = sorted((answer_a, answer_b))
    payload = json.dumps([judge_id, instruction, prompt_json(prompt), low, high], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def swapped(verdict: Verdict) -> Verdict:
    """The same judgement with the answers' roles exchanged (what (b, a) would have been told)."""
    preferred = {"a": "b", "b": "a", "tie": "tie"}[verdict.preferred]
    return Verdict(preferred, verdict.confidence, verdict.second_order, verdict.first_order,
                   (verdict.raw[1], verdict.raw[0]))


@dataclass(frozen=True)
class JudgedBatch:
    verdicts: list[Verdict]
    judged: int  # pairs the annotator was asked about now
    cached: int  # pairs answered from the store (or repeated within the batch)


class AIFeedbackStore:
    """Judgements under ``root`` (created on first write); see the module docstring."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._rows: dict[str, dict] = {row["key"]: row for row in self.read().to_dict("records")}

    def __len__(self) -> int:
        return len(self._rows)

    def read(self) -> pd.DataFrame:
        """Every stored judgement, one row per key, oldest first."""
        parts = sorted(self.root.glob(PART_GLOB)) if self.root.is_dir() else []
        if not parts:
            return pd.DataFrame(columns=list(COLUMNS))
        frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
        return frame.drop_duplicates("key", keep="first").reset_index(drop=True)

    def judge(self, judge: Judge, prompts: Sequence, answers_a: Sequence[str], answers_b: Sequence[str],
              policy_version: str) -> JudgedBatch:
        """Verdicts for every pair: stored ones reused, the rest judged in one batch (both orders) and stored.

        ``policy_version`` names the policy that sampled the answers (recorded with each new row).
        """
        instruction = getattr(judge, "instruction", "") or ""
        keys = [judgement_key(judge.id, instruction, p, a, b) for p, a, b in zip(prompts, answers_a, answers_b)]
        todo: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in self._rows and key not in todo:
                todo[key] = i
        new_rows = []
        if todo:
            asked = list(todo.values())
            verdicts = judge.judge([prompts[i] for i in asked], [answers_a[i] for i in asked],
                                   [answers_b[i] for i in asked])
            now = time.time()
            new_rows = [self._row(keys[i], judge.id, instruction, prompts[i], answers_a[i], answers_b[i], v,
                                  policy_version, now) for i, v in zip(asked, verdicts)]
            self._write(new_rows)
            self._rows.update((row["key"], row) for row in new_rows)
        verdicts = [self._verdict(self._rows[key], a) for key, a in zip(keys, answers_a)]
        return JudgedBatch(verdicts, judged=len(new_rows), cached=len(keys) - len(new_rows))

    @staticmethod
    def _row(key, judge_id, instruction, prompt, answer_a, answer_b, verdict: Verdict, policy_version, now) -> dict:
        return {"key": key, "judge_id": judge_id, "instruction": instruction, "prompt": prompt_json(prompt),
                "answer_a": answer_a, "answer_b": answer_b, "preferred": verdict.preferred,
                "confidence": verdict.confidence, "first_order": verdict.first_order,
                "second_order": verdict.second_order, "raw_first": verdict.raw[0], "raw_second": verdict.raw[1],
                "policy_version": policy_version, "judged_at": now}

    @staticmethod
    def _verdict(row: dict, answer_a: str) -> Verdict:
        verdict = Verdict(row["preferred"], float(row["confidence"]), float(row["first_order"]),
                          float(row["second_order"]), (row["raw_first"], row["raw_second"]))
        return verdict if row["answer_a"] == answer_a else swapped(verdict)

    def _write(self, rows: list[dict]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        hidden = self.root / f".{name}.tmp"
        pd.DataFrame(rows, columns=list(COLUMNS)).to_parquet(hidden, index=False)
        os.replace(hidden, self.root / name)


def preference_pairs(judgements: pd.DataFrame) -> pd.DataFrame:
    """The judgements whose two orders agreed, as preference pairs (``prompt``, ``chosen``, ``rejected``),
    for an offline method configured to train on AI feedback; ties carry no preference and are left out."""
    decided = judgements[judgements["preferred"].isin(["a", "b"])]
    prefers_a = decided["preferred"] == "a"
    return pd.DataFrame({
        "prompt": [json.loads(p) for p in decided["prompt"]],
        "chosen": decided["answer_a"].where(prefers_a, decided["answer_b"]).tolist(),
        "rejected": decided["answer_b"].where(prefers_a, decided["answer_a"]).tolist(),
        "judge_id": decided["judge_id"].tolist(),
        "instruction": decided["instruction"].tolist(),
    }).reset_index(drop=True)


def summary(judgements: pd.DataFrame) -> dict:
    """Counts and the annotators' consistency over the stored judgements, for the asset's metadata."""
    n = len(judgements)
    if not n:
        return {"judgements": 0}
    first, second = judgements["first_order"].astype(float), judgements["second_order"].astype(float)
    sign_first = (first > 0.5).astype(int) - (first < 0.5).astype(int)
    sign_second = (second > 0.5).astype(int) - (second < 0.5).astype(int)
    return {
        "judgements": n,
        "preferences": int(judgements["preferred"].isin(["a", "b"]).sum()),
        "ties": int((judgements["preferred"] == "tie").sum()),
        "agreement_rate": float((sign_first == -sign_second).mean()),
        "position_bias_rate": float(((sign_first == sign_second) & (sign_first != 0)).mean()),
        "judges": int(judgements["judge_id"].nunique()),
        "instructions": sorted(judgements["instruction"].unique().tolist()),
        "policy_versions": int(judgements["policy_version"].nunique()),
    }
