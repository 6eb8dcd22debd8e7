"""Validation: GX suite routing, the batch gate, and the real HH-RLHF sample."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from alignment_pipelines.data.ingest.chunks import read_feedback_file
from alignment_pipelines.data.schemas import PAIR_COLUMNS, QUARANTINE_COLUMNS, ReasonCode
from alignment_pipelines.data.validate.engine import validate_file, validate_records
from alignment_pipelines.data.validate.gate import run_expectation_suite
from alignment_pipelines.data.validate.rules import ValidationRules

HH_FILE = Path(__file__).parents[1].parent / "shared/data/hh-rlhf-harmless-base.jsonl.gz"


def pair(prompt="What is 2 + 2?", chosen="4.", rejected="5, probably."):
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})


@pytest.fixture()
def malformed_file(tmp_path) -> Path:
    lines = [
        pair(),  # 1 good
        '{"prompt": "p", "chosen": "c", "rejected": "r"',  # 2 truncated JSON
        '"just a string"',  # 3 not an object
        pair(chosen=5),  # 4 wrong type
        pair(chosen="   "),  # 5 empty
        pair(prompt="Say hi", chosen="Hi!", rejected="Hi!"),  # 6 identical pair
        pair(prompt="Name a colour", chosen="Blue\x07", rejected="No."),  # 7 control character
        json.dumps({"input": "x", "output": "y"}),  # 8 unknown layout
        pair(),  # 9 duplicate of row 1
        "",  # blank, not a row
        pair(prompt="Capital of Peru?", chosen="Lima.", rejected="Paris."),  # 11 good
        pair(prompt="", chosen="a", rejected="b"),  # 12 empty prompt
        pair(prompt="Long?", chosen="ok", rejected="x" * 200),  # 13 too long (max_chars=100)
        pair(prompt="Say hi", chosen="Hi!", rejected="Hi!"),  # 14 identical again (not 'duplicate': first failure wins)
    ]
    path = tmp_path / "malformed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_file_routing(malformed_file):
    result = validate_file(malformed_file, ValidationRules(max_chars=100))
    assert result.rows == 13
    assert len(result.accepted) + len(result.quarantined) == result.rows
    assert list(result.accepted.columns) == PAIR_COLUMNS
    assert list(result.quarantined.columns) == QUARANTINE_COLUMNS
    assert result.accepted["row"].tolist() == [1, 11]
    reasons = dict(zip(result.quarantined["row"], result.quarantined["reason"]))
    assert reasons == {
        2: ReasonCode.INVALID_JSON,
        3: ReasonCode.NOT_AN_OBJECT,
        4: ReasonCode.WRONG_TYPE,
        5: ReasonCode.EMPTY_FIELD,
        6: ReasonCode.IDENTICAL_PAIR,
        7: ReasonCode.INVALID_TEXT,
        8: ReasonCode.UNKNOWN_LAYOUT,
        9: ReasonCode.DUPLICATE,
        12: ReasonCode.EMPTY_FIELD,
        13: ReasonCode.TOO_LONG,
        14: ReasonCode.IDENTICAL_PAIR,
    }
    q = result.quarantined.set_index("row")
    assert "row 1" in q.loc[9, "detail"]
    assert q.loc[7, "raw"] == pair(prompt="Name a colour", chosen="Blue\x07", rejected="No.")
    summary = result.summary()
    json.dumps(summary)
    assert summary["rows"] == 13 and summary["accepted"] == 2 and summary["quarantined"] == 11
    assert summary["by_reason"]["identical_pair"] == 2
    assert sum(summary["by_reason"].values()) == 11


def test_first_failure_wins_in_suite_order(tmp_path):
    # empty chosen *and* too long rejected with control chars: EMPTY_FIELD comes first
    path = tmp_path / "multi.jsonl"
    path.write_text(pair(chosen="", rejected="\x00" * 500) + "\n", encoding="utf-8")
    result = validate_file(path, ValidationRules(max_chars=100))
    assert result.quarantined["reason"].tolist() == [ReasonCode.EMPTY_FIELD]


def test_suite_passes_on_accepted_and_fails_on_identical_pair(malformed_file):
    rules = ValidationRules(max_chars=100)
    result = validate_file(malformed_file, rules)
    report = run_expectation_suite(result.accepted, rules)
    assert report.success, report.markdown()
    assert all(r["unexpected_count"] == 0 for r in report.results)

    bad = pd.concat(
        [result.accepted, pd.DataFrame([{"row": 99, "prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "a"}])],
        ignore_index=True,
    )
    report = run_expectation_suite(bad, rules)
    assert not report.success
    failed = [r for r in report.results if not r["success"]]
    assert [(r["expectation"], r["column"], r["reason"]) for r in failed] == [
        ("expect_column_values_to_be_in_set", "pair_differs", ReasonCode.IDENTICAL_PAIR)
    ]
    assert failed[0]["unexpected_count"] == 1
    md = report.markdown()
    assert "expect_column_values_to_be_in_set" in md and "identical_pair" in md and "❌" in md


def test_suite_flags_duplicates_in_accepted():
    df = pd.DataFrame([{"row": i, "prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"} for i in (1, 2)])
    report = run_expectation_suite(df)
    assert not report.success
    assert [r["reason"] for r in report.results if not r["success"]] == [ReasonCode.DUPLICATE]


def test_quarantine_fraction_gate(tmp_path):
    lines = [pair(prompt=f"Question {i}?", chosen=f"Answer {i}.", rejected=f"Answer {i}.") for i in range(8)]
    lines += [pair(prompt="Fine?", chosen="Yes.", rejected="Maybe not, who knows.")]
    path = tmp_path / "mostly_bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = validate_file(path)
    assert len(result.accepted) == 1 and len(result.quarantined) == 8
    report = run_expectation_suite(result.accepted, quarantined_count=len(result.quarantined))
    assert not report.success
    gate = report.results[-1]
    assert gate["expectation"] == "expect_quarantine_fraction_to_be_at_most"
    assert gate["success"] is False and gate["reason"] == ReasonCode.TOO_MANY_QUARANTINED
    assert gate["unexpected_count"] == 8
    # the row-level expectations themselves pass on the accepted rows
    assert all(r["success"] for r in report.results[:-1])
    # and a lenient gate passes
    assert run_expectation_suite(result.accepted, ValidationRules(max_quarantine_fraction=0.95), 8).success


def test_empty_inputs(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    result = validate_file(path)
    assert result.rows == 0 and result.accepted.empty and result.quarantined.empty
    assert result.summary()["by_reason"] == {}
    assert run_expectation_suite(result.accepted, quarantined_count=0).success


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH-RLHF sample not present")
def test_hh_rlhf_real_file_validation():
    imported = read_feedback_file(HH_FILE)
    validate_records(imported)  # warm up: GX import and context are one-off costs
    start = time.perf_counter()
    result = validate_records(imported)
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"validating 1,717 rows took {elapsed:.1f}s"

    assert result.rows == 1717
    assert len(result.accepted) == 1709
    assert len(result.quarantined) == 8
    assert result.counts_by_reason() == {"empty_field": 3, "prompt_mismatch": 5}
    reasons = dict(zip(result.quarantined["row"], result.quarantined["reason"]))
    assert reasons[387] == ReasonCode.EMPTY_FIELD
    assert reasons[692] == ReasonCode.EMPTY_FIELD
    assert reasons[816] == ReasonCode.EMPTY_FIELD
    assert reasons[929] == ReasonCode.PROMPT_MISMATCH
    assert reasons[1509] == ReasonCode.PROMPT_MISMATCH
    assert "\\n\\nAssistant: " in result.quarantined.set_index("row").loc[387, "raw"]

    report = run_expectation_suite(result.accepted, quarantined_count=len(result.quarantined))
    assert report.success, report.markdown()
