"""validate_file_to_parquet: chunked streaming, duplicates across chunks and batches, summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from alignment_pipelines.data.records import read_records
from alignment_pipelines.data.validate.engine import row_key, row_keys, validate_file, validate_file_to_parquet
from alignment_pipelines.data.validate.rules import ValidationRules

HH_FILE = Path(__file__).parents[1].parent / "shared/data/hh-rlhf-harmless-base.jsonl.gz"


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."} for i in range(start, start + n)]


def run(tmp_path, path, name="b", **kw):
    a, q = tmp_path / f"{name}.accepted.parquet", tmp_path / f"{name}.quarantine.parquet"
    summary = validate_file_to_parquet(path, a, q, **kw)
    return summary, read_records(a), pd.read_parquet(q)


def test_chunked_equals_whole_and_duplicates_span_chunks(tmp_path):
    rows = pairs(10)
    rows[7] = dict(rows[1])  # duplicate of row 2, in a later chunk
    rows[8] = "{broken"
    rows[9] = {**rows[3], "chosen": "Same.", "rejected": "Same."}
    path = write(tmp_path / "b.jsonl", rows)
    chunks = []
    summary, accepted, quarantine = run(tmp_path, path, chunk_rows=3, on_chunk=chunks.append)
    assert summary["chunks"] == 4 and summary["chunk_rows"] == 3
    assert chunks == [3, 3, 3, 1]  # each chunk's rows, as a progress bar counts them
    assert (summary["rows"], summary["accepted"], summary["quarantined"]) == (10, 7, 3)
    assert summary["by_reason"] == {"duplicate": 1, "identical_pair": 1, "invalid_json": 1}
    assert accepted["row"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    q = quarantine.set_index("row")
    assert q.loc[8, "reason"] == "duplicate" and "row 2" in q.loc[8, "detail"]
    assert [s["row"] for s in summary["samples"]] == [8, 9, 10]
    assert set(summary["samples"][0]) == {"row", "reason", "detail"}
    assert summary["suite_success"] is True and summary["kind"] == "pairwise"
    json.dumps(summary)

    whole = validate_file(path)
    assert whole.counts_by_reason() == summary["by_reason"]
    assert whole.accepted["row"].tolist() == accepted["row"].tolist()
    assert accepted["prompt"].tolist() == whole.accepted["prompt"].tolist()


@pytest.mark.parametrize("kind, rows", [
    ("pairwise", [{"prompt": [{"role": "system", "content": "Be \\ brief."}, {"role": "user", "content": 'Say "hi"\n'}],
                   "chosen": "Hi.\tThere ü", "rejected": "No."}, {"prompt": "Q?", "chosen": "A.", "rejected": "A."},
                  "{broken", {"prompt": "P?", "chosen": "B.", "rejected": "C."}]),
    ("binary", [{"prompt": "Q?", "completion": "Yes.", "label": True}, {"prompt": "R?", "completion": "No.", "label": False},
                {"prompt": "S?", "completion": "Maybe.", "label": "maybe"}]),
    ("prompts", [{"prompt": "Q?"}, {"prompt": "   "}, {"prompt": [{"role": "user", "content": "Z?"}]}]),
])
def test_jsonl_outputs_hold_the_rows_of_the_parquet_outputs(tmp_path, kind, rows, capsys):
    from alignment_pipelines.cli import main

    path = write(tmp_path / "b.jsonl", rows)
    summary, accepted, quarantine = run(tmp_path, path)
    assert summary["kind"] == kind and summary["accepted"] == 2
    main(["validate", str(path), "--format", "jsonl", "--output-dir", str(tmp_path / "cli")])  # the gate may block
    assert json.loads(capsys.readouterr().out)["accepted"] == 2
    lines = (tmp_path / "cli" / "b.jsonl.accepted.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == json.loads(accepted.to_json(orient="records", force_ascii=False))
    assert lines == [json.dumps(r, ensure_ascii=False) for r in json.loads(accepted.to_json(orient="records"))]
    quarantined = (tmp_path / "cli" / "b.jsonl.quarantine.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in quarantined] == quarantine.to_dict("records")


def test_known_keys_quarantine_rows_of_earlier_batches(tmp_path):
    first = write(tmp_path / "first.jsonl", pairs(5))
    s1, accepted1, _ = run(tmp_path, first, "first")
    known = {row_key(r, "pairwise") for r in accepted1.to_dict("records")}
    assert len(known) == 5 and row_keys(accepted1) == known
    second = write(tmp_path / "second.jsonl", pairs(4, start=3))  # rows 1-2 were in batch one
    s2, accepted2, q2 = run(tmp_path, second, "second", known_keys=known, chunk_rows=1)
    assert s2["by_reason"] == {"duplicate_across_batches": 2}
    assert q2["row"].tolist() == [1, 2] and accepted2["row"].tolist() == [3, 4]
    # validate_records takes the same keys
    assert validate_file(second, known_keys=known).counts_by_reason() == {"duplicate_across_batches": 2}
    # the key ignores the row number and surrounding whitespace, not content
    rec = {"row": 1, "prompt": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"}
    assert row_key(rec, "pairwise") == row_key({**rec, "row": 9, "chosen": " a "}, "pairwise")
    assert row_key(rec, "pairwise") != row_key({**rec, "rejected": "c"}, "pairwise")


def test_gate_fails_on_a_mostly_bad_batch(tmp_path):
    rows = [{"prompt": f"Q{i}", "chosen": "x", "rejected": "x"} for i in range(6)] + pairs(2)
    summary, accepted, _ = run(tmp_path, write(tmp_path / "bad.jsonl", rows))
    assert summary["suite_success"] is False
    assert summary["suite"]["quarantine_fraction"] == 0.75
    assert [f["expectation"] for f in summary["suite"]["failed"]] == ["expect_quarantine_fraction_to_be_at_most"]
    lenient = ValidationRules(max_quarantine_fraction=0.9)
    assert run(tmp_path, tmp_path / "bad.jsonl", "lenient", rules=lenient)[0]["suite_success"] is True


def test_binary_and_prompt_batches_stream_to_parquet(tmp_path):
    binary = [
        {"prompt": "Hi", "completion": "Hello!", "label": True},
        {"prompt": "Hi", "completion": "Go away.", "label": False},
        {"prompt": "Hi", "completion": "Meh.", "label": "yes"},  # label must be a boolean
        {"prompt": "Hi", "completion": "  ", "label": True},
        {"prompt": "Hi", "completion": "Hello!", "label": True},  # duplicate
        {"prompt": "Hi", "completion": "Hello!", "label": False},  # same text, other label: not a duplicate
    ]
    summary, accepted, quarantine = run(tmp_path, write(tmp_path / "bin.jsonl", binary), "bin", chunk_rows=4)
    assert (summary["kind"], summary["layout"]) == ("binary", "binary")
    assert summary["by_reason"] == {"duplicate": 1, "empty_field": 1, "wrong_type": 1}
    assert list(accepted.columns) == ["row", "prompt", "completion", "label"]
    assert accepted["label"].tolist() == [True, False, False] and accepted["label"].dtype == bool
    assert summary["suite_success"] is True

    prompts = [{"prompt": "Tell me a joke."}, {"prompt": " Tell me a joke. "}, {"prompt": ""}, {"messages": [{"role": "user", "content": "Hi"}]}]
    summary, accepted, _ = run(tmp_path, write(tmp_path / "p.jsonl", prompts), "p")
    assert summary["kind"] == "prompts" and list(accepted.columns) == ["row", "prompt"]
    assert summary["by_reason"] == {"duplicate": 1, "empty_field": 1}
    assert accepted["row"].tolist() == [1, 4]


def test_empty_file_writes_empty_outputs(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    summary, accepted, quarantine = run(tmp_path, path)
    assert (summary["rows"], summary["accepted"], summary["quarantined"]) == (0, 0, 0)
    assert accepted.empty and quarantine.empty and summary["suite_success"] is True
    assert list(accepted.columns) == ["row", "prompt", "chosen", "rejected"]


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH-RLHF sample not present")
def test_hh_rlhf_streams_with_every_row_accounted_for(tmp_path):
    summary, accepted, quarantine = run(tmp_path, HH_FILE, chunk_rows=500)
    assert summary["layout"] == "hh-rlhf" and summary["chunks"] == 4
    assert (summary["rows"], summary["accepted"], summary["quarantined"]) == (1717, 1709, 8)
    assert summary["by_reason"] == {"empty_field": 3, "prompt_mismatch": 5}
    assert sorted(accepted["row"].tolist() + quarantine["row"].tolist()) == sorted(set(accepted["row"]) | set(quarantine["row"]))
    assert summary["suite_success"] is True
