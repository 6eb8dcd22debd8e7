"""Validation rules beyond the basics: PII screening, token lengths, per-kind suites."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from alignment_pipelines.data.validate.pii import find_pii, luhn_ok, redact_pii
from alignment_pipelines.data.validate.engine import validate_file, validate_file_to_parquet
from alignment_pipelines.data.validate.gate import run_expectation_suite
from alignment_pipelines.data.validate.rules import ValidationRules


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> str:
    """A word-level tokenizer built offline: one token per word or punctuation mark."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["user assistant hello world answer"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    folder = tmp_path_factory.mktemp("tok")
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


def test_pii_patterns():
    assert find_pii("write to jane.doe+x@mail.example.org today") == {"email": 1}
    assert find_pii("call +1 415-555-0132 or (020) 7946 0958") == {"phone": 2}
    assert find_pii("card 4111 1111 1111 1111 and 5500-0000-0000-0004") == {"card": 2}
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert find_pii("not a card 4111 1111 1111 1112, in 2023-2024, v1.2.3, 1234567, 3.14159") == {}
    text, counts = redact_pii("mail a@b.co, phone 555-123-4567, card 4111111111111111.")
    assert text == "mail [EMAIL], phone [PHONE], card [CARD]."
    assert counts == {"email": 1, "phone": 1, "card": 1}


def test_pii_redact_and_quarantine(tmp_path):
    rows = [
        {"prompt": "My mail is bob@example.com, answer me.", "chosen": "Noted.", "rejected": "Ok."},
        {"prompt": "Hi", "chosen": "Call 555-123-4567.", "rejected": "No."},
        {"prompt": "Clean?", "chosen": "Yes.", "rejected": "No."},
        {"prompt": [{"role": "user", "content": "Pay with 4111 1111 1111 1111"}], "chosen": [{"role": "assistant", "content": "Done."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
    ]
    path = write(tmp_path / "pii.jsonl", rows)
    off = validate_file(path)
    assert len(off.accepted) == 4 and off.summary()["pii"] is None

    redacted = validate_file(path, ValidationRules(pii="redact"))
    assert len(redacted.accepted) == 4
    assert redacted.summary()["pii"] == {"mode": "redact", "rows": 3, "email": 1, "phone": 1, "card": 1}
    acc = redacted.accepted.set_index("row")
    assert acc.loc[1, "prompt"][0]["content"] == "My mail is [EMAIL], answer me."
    assert acc.loc[2, "chosen"] == "Call [PHONE]."
    assert acc.loc[4, "prompt"][0]["content"] == "Pay with [CARD]"

    rules = ValidationRules(pii="quarantine")
    quarantined = validate_file(path, rules)
    assert quarantined.accepted["row"].tolist() == [3]
    assert quarantined.counts_by_reason() == {"pii": 3}
    assert quarantined.summary()["pii"]["rows"] == 3
    q = quarantined.quarantined.set_index("row")
    assert q.loc[1, "detail"] == "contains personal data: 1 email"
    assert "bob@example.com" not in q.loc[1, "raw"] and "[EMAIL]" in q.loc[1, "raw"]  # not persisted
    # the batch gate carries the same rule
    assert run_expectation_suite(quarantined.accepted, rules).success
    assert not run_expectation_suite(off.accepted, rules).success

    summary = validate_file_to_parquet(path, tmp_path / "a.parquet", tmp_path / "q.parquet", ValidationRules(pii="redact"), chunk_rows=2)
    assert summary["pii"] == {"mode": "redact", "rows": 3, "email": 1, "phone": 1, "card": 1}
    with pytest.raises(ValueError):
        ValidationRules(pii="maybe")


def test_token_lengths_counted_or_quarantined(tmp_path, word_tokenizer):
    rows = [
        {"prompt": "hello", "chosen": "answer", "rejected": "world"},  # prompt "user : hello" = 3 tokens
        {"prompt": "hello " * 10, "chosen": "answer", "rejected": "world"},  # 12 prompt tokens
        {"prompt": "hello world", "chosen": "answer " * 6, "rejected": "world"},  # 6 completion tokens
    ]
    path = write(tmp_path / "t.jsonl", rows)
    rules = ValidationRules(tokenizer=word_tokenizer, max_prompt_tokens=5, max_completion_tokens=5)
    result = validate_file(path, rules)
    assert len(result.accepted) == 3  # default: over-length rows are accepted and counted
    t = result.summary()["truncation"]
    assert t["policy"] == "accept_and_count" and result.summary()["over_length_policy"] == "accept_and_count"
    assert (t["measured_rows"], t["prompt_over"], t["completion_over"], t["rows_over"]) == (3, 1, 1, 2)
    assert t["prompt_over_percent"] == 33.33 and t["prompt_tokens_max"] == 12 and t["completion_tokens_max"] == 6

    strict = ValidationRules(tokenizer=word_tokenizer, max_prompt_tokens=5, max_completion_tokens=5, quarantine_over_length=True)
    result = validate_file(path, strict)
    assert result.accepted["row"].tolist() == [1]
    q = result.quarantined.set_index("row")
    assert q.loc[2, "reason"] == "too_long" and "5 tokens" in q.loc[2, "detail"]
    assert q.loc[3, "reason"] == "too_long" and "answer" in q.loc[3, "detail"]
    assert result.summary()["truncation"]["rows_over"] == 0
    assert run_expectation_suite(result.accepted, strict).success

    summary = validate_file_to_parquet(path, tmp_path / "a.parquet", tmp_path / "q.parquet", rules, chunk_rows=1)
    assert summary["truncation"]["prompt_over"] == 1 and summary["truncation"]["measured_rows"] == 3
    assert validate_file(path).summary()["truncation"] is None
    with pytest.raises(FileNotFoundError):
        validate_file(path, ValidationRules(tokenizer=str(tmp_path / "nope")))


def test_gate_infers_kind_from_columns():
    binary = pd.DataFrame(
        [{"row": 1, "prompt": [{"role": "user", "content": "q"}], "completion": "a", "label": True},
         {"row": 2, "prompt": [{"role": "user", "content": "q"}], "completion": "a", "label": "no"}]
    )
    report = run_expectation_suite(binary)
    assert [(r["column"], r["reason"]) for r in report.failed] == [("label_type", "wrong_type")]
    prompts = pd.DataFrame([{"row": 1, "prompt": [{"role": "user", "content": "q"}]}, {"row": 2, "prompt": [{"role": "user", "content": " "}]}])
    report = run_expectation_suite(prompts, quarantined_count=0)
    assert [r["reason"] for r in report.failed] == ["empty_field"]
