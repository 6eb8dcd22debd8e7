"""The validation's rules as data: the knobs (`ValidationRules`), the patterns, the reasons' details, the
token-length accounting and the batch gate's quarantine-fraction limit. The router evaluates them over Arrow
columns, the gate (`gate`) as a Great Expectations suite: one definition for both."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pandas as pd

from alignment_pipelines.data.columnar import COMPLETION_FIELDS, WS_CLASS
from alignment_pipelines.data.schemas import ReasonCode


# C0 controls except tab/newline/carriage return, DEL, C1 controls and U+FFFD (which lone surrogates, from
# invalid UTF-8 or "\ud800" escapes, become before the rules run). Written with the characters themselves,
# so that Python's `re` and RE2 (Arrow, pandas' Arrow strings under GX) read the pattern alike.
CONTROL_CHARS = "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]"
# Python's `\S` (any character that is not str.isspace()), spelled out so RE2 means the same
NON_BLANK = f"[^{WS_CLASS}]"
GATE_EXPECTATION = "expect_quarantine_fraction_to_be_at_most"
KEY_COLUMN = {"pairwise": "pair_key", "binary": "feedback_key", "prompts": "prompt_key"}
# per kind: (columns that must be non-blank, text columns checked for control chars and length)
TEXT_RULES = {
    "pairwise": (("prompt_final", "chosen", "rejected"), ("prompt_text", "chosen", "rejected")),
    "binary": (("prompt_final", "completion"), ("prompt_text", "completion")),
    "prompts": (("prompt_final",), ("prompt_text",)),
}


@dataclass
class ValidationRules:
    max_chars: int = 20_000  # per field (rendered prompt / chosen / rejected / completion)
    max_quarantine_fraction: float = 0.5  # batch-level gate used by the blocking check
    tokenizer: str | None = None  # a local tokenizer folder (or tokenizer.json file)
    max_prompt_tokens: int = 1024
    max_completion_tokens: int = 1024
    quarantine_over_length: bool = False  # False: over-length rows are accepted and counted
    pii: Literal["off", "redact", "quarantine"] = "off"

    def __post_init__(self) -> None:
        if self.pii not in ("off", "redact", "quarantine"):
            raise ValueError(f"pii must be 'off', 'redact' or 'quarantine', got {self.pii!r}")

    @property
    def over_length_policy(self) -> str:
        return "quarantine" if self.quarantine_over_length else "accept_and_count"

    def suite_key(self, kind: str) -> tuple:
        tokens = (self.max_prompt_tokens, self.max_completion_tokens) if self._token_rule else None
        return (kind, self.max_chars, tokens, self.pii == "quarantine")

    @property
    def _token_rule(self) -> bool:
        return bool(self.tokenizer) and self.quarantine_over_length



DETAIL = {
    ReasonCode.EMPTY_FIELD: "{column} is empty or only whitespace",
    ReasonCode.INVALID_TEXT: "{column} contains control characters or invalid Unicode",
    ReasonCode.TOO_LONG: "{column} is longer than {max_chars} characters",
    ReasonCode.IDENTICAL_PAIR: "chosen and rejected are identical",
    ReasonCode.WRONG_TYPE: "label must be a boolean",
    ReasonCode.PII: "contains personal data (e-mail address, phone number or card number)",
    ReasonCode.DUPLICATE: "same content as row {first} of this batch",
    ReasonCode.DUPLICATE_ACROSS_BATCHES: "same content as a row of an earlier batch",
}
TOKEN_DETAIL = {
    "prompt_tokens": "prompt is longer than {n} tokens",
    "completion_tokens": "an answer is longer than {n} tokens",
}
COLUMN_NAMES = {"prompt_final": "the prompt's last user turn", "prompt_text": "prompt"}


def new_truncation(rules: ValidationRules) -> dict:
    return {
        "tokenizer": str(rules.tokenizer),
        "max_prompt_tokens": rules.max_prompt_tokens,
        "max_completion_tokens": rules.max_completion_tokens,
        "rows": 0,
        "prompt_over": 0,
        "completion_over": 0,
        "any_over": 0,
        "prompt_tokens_max": 0,
        "completion_tokens_max": 0,
        "prompt_tokens_sum": 0,
        "completion_tokens_sum": 0,
    }


def add_truncation(acc: dict | None, other: dict | None) -> dict | None:
    if other is None:
        return acc
    if acc is None:
        return dict(other)
    for k, v in other.items():
        if k.endswith("_max"):
            acc[k] = max(acc[k], v)
        elif isinstance(v, int) and not k.startswith("max_"):
            acc[k] += v
    return acc


def truncation_summary(t: dict | None, policy: str) -> dict | None:
    if t is None:
        return None
    n = t["rows"]

    def pct(x: int) -> float:
        return round(100.0 * x / n, 2) if n else 0.0

    return {
        "tokenizer": t["tokenizer"],
        "policy": policy,
        "measured_rows": n,  # accepted rows
        "max_prompt_tokens": t["max_prompt_tokens"],
        "max_completion_tokens": t["max_completion_tokens"],
        "prompt_over": t["prompt_over"],
        "prompt_over_percent": pct(t["prompt_over"]),
        "completion_over": t["completion_over"],
        "completion_over_percent": pct(t["completion_over"]),
        "rows_over": t["any_over"],
        "rows_over_percent": pct(t["any_over"]),
        "prompt_tokens_max": t["prompt_tokens_max"],
        "completion_tokens_max": t["completion_tokens_max"],
        "prompt_tokens_mean": round(t["prompt_tokens_sum"] / n, 1) if n else 0.0,
        "completion_tokens_mean": round(t["completion_tokens_sum"] / n, 1) if n else 0.0,
    }



def count_truncation(acc: dict, frame: pd.DataFrame, rules: ValidationRules, kind: str) -> None:
    p = frame["prompt_tokens"].to_numpy()
    p_over = p > rules.max_prompt_tokens
    acc["rows"] += len(frame)
    acc["prompt_over"] += int(p_over.sum())
    acc["prompt_tokens_max"] = max(acc["prompt_tokens_max"], int(p.max()))
    acc["prompt_tokens_sum"] += int(p.sum())
    if COMPLETION_FIELDS[kind]:
        c = frame["completion_tokens"].to_numpy()
        c_over = c > rules.max_completion_tokens
        acc["completion_over"] += int(c_over.sum())
        acc["completion_tokens_max"] = max(acc["completion_tokens_max"], int(c.max()))
        acc["completion_tokens_sum"] += int(c.sum())
        acc["any_over"] += int((p_over | c_over).sum())
    else:
        acc["any_over"] += int(p_over.sum())



# Repeats of rows already accepted are not defects: a weekly export that overlaps last week's is fine.
NOT_DEFECTS = frozenset({ReasonCode.DUPLICATE, ReasonCode.DUPLICATE_ACROSS_BATCHES})


def defect_count(by_reason: dict[str, int]) -> int:
    """Quarantined rows that count against the batch gate (everything but duplicates)."""
    return sum(n for reason, n in by_reason.items() if reason not in NOT_DEFECTS)


def gate_result(quarantined: int, rows: int, rules: ValidationRules) -> dict:
    """`quarantined` defects among `rows` non-duplicate input rows."""
    fraction = (quarantined / rows) if rows else 0.0
    return {
        "expectation": GATE_EXPECTATION,
        "column": None,
        "success": fraction <= rules.max_quarantine_fraction,
        "unexpected_count": int(quarantined),
        "reason": ReasonCode.TOO_MANY_QUARANTINED,
        "observed_value": round(fraction, 4),
        "max_value": rules.max_quarantine_fraction,
    }

