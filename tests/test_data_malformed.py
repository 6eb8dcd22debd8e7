"""The malformed-file corpus: every file gives a clear error or quarantine, never a crash, and no
row is lost (accepted + quarantined = rows). Files are generated here, not committed."""

from __future__ import annotations

import gzip
import json
import random
import time
from pathlib import Path

import pandas as pd
import pytest

from alignment_pipelines.data.ingest.chunks import read_feedback_file

from alignment_pipelines.data.ingest.formats import FeedbackFileError
from alignment_pipelines.data.records import read_records
from alignment_pipelines.data.validate.engine import validate_file, validate_file_to_parquet
from alignment_pipelines.data.validate.rules import ValidationRules


def pair(prompt="What is 2 + 2?", chosen="4.", rejected="5."):
    return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})


def corpus(tmp: Path) -> dict[str, Path]:
    """name -> file. Text files a validator must survive (binary garbage is a separate case)."""
    files: dict[str, bytes] = {
        "truncated_jsonl": (pair() + "\n" + pair(prompt="Two?")[:-15]).encode(),
        "truncated_json_array": json.dumps([json.loads(pair()), json.loads(pair(prompt="B"))])[:-20].encode(),
        "wrong_types": "\n".join(
            [pair(), json.dumps({"prompt": ["x"], "chosen": "a", "rejected": "b"}), json.dumps({"prompt": "p", "chosen": None, "rejected": 1}),
             json.dumps({"prompt": {"a": 1}, "chosen": "a", "rejected": "b"}), "[1,2]", "42", "null"]
        ).encode(),
        "empty_strings": "\n".join([pair(prompt="", chosen="a"), pair(chosen=""), pair(rejected=" \t "), pair(prompt="ok?")]).encode(),
        "identical_pairs": "\n".join([pair(chosen="Same.", rejected="Same."), pair(chosen=" Same.", rejected="Same. "), pair(prompt="ok?")]).encode(),
        "mixed_layouts": "\n".join(
            [pair(), json.dumps({"prompt": "Hi", "completion": "Yo", "label": True}), json.dumps({"messages": [{"role": "user", "content": "x"}]}),
             json.dumps({"zzz": 1}), pair(prompt="Two?")]
        ).encode(),
        "invalid_utf8": b"\n".join(
            [pair().encode(), b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', b"\xff\xfe\xfd", pair(prompt="ok?").encode(),
             json.dumps({"prompt": "lone \ud800 surrogate", "chosen": "a", "rejected": "b"}).encode()]
        ),
        "invalid_utf8_csv": b'prompt,chosen,rejected\n"caf\xe9","a","b"\n"ok?","a","b"\n',
        "control_chars": "\n".join([pair(chosen="bell\x07"), pair(prompt="nul\x00?"), pair(prompt="ok?")]).encode(),
        "deep_nesting": ("[" * 100_000 + "]" * 100_000 + "\n" + pair()).encode(),
        "crlf_bom": ("\ufeff" + pair() + "\r\n" + pair(prompt="Two?") + "\r\n").encode(),
    }
    out = {}
    for name, data in files.items():
        suffix = ".csv" if name.endswith("csv") else ".json" if name == "truncated_json_array" else ".jsonl"
        path = tmp / f"{name}{suffix}"
        path.write_bytes(data)
        out[name] = path
    return out


EXPECTED = {  # name -> (rows, accepted)
    "truncated_jsonl": (2, 1),
    "truncated_json_array": (2, 1),
    "wrong_types": (7, 1),
    "empty_strings": (4, 1),
    "identical_pairs": (3, 1),
    "mixed_layouts": (5, 2),
    "invalid_utf8": (5, 2),
    "invalid_utf8_csv": (2, 1),
    "control_chars": (3, 1),
    "deep_nesting": (2, 1),
    "crlf_bom": (2, 2),
}


def test_malformed_corpus_never_crashes_and_loses_nothing(tmp_path):
    files = corpus(tmp_path)
    assert set(files) == set(EXPECTED)
    for name, path in files.items():
        summary = validate_file_to_parquet(path, tmp_path / "out" / f"{name}.a.parquet", tmp_path / "out" / f"{name}.q.parquet", chunk_rows=3)
        assert summary["accepted"] + summary["quarantined"] == summary["rows"], name
        assert (summary["rows"], summary["accepted"]) == EXPECTED[name], (name, summary)
        assert sum(summary["by_reason"].values()) == summary["quarantined"], name
        quarantine = pd.read_parquet(tmp_path / "out" / f"{name}.q.parquet")
        accepted = read_records(tmp_path / "out" / f"{name}.a.parquet")
        assert len(quarantine) == summary["quarantined"] and len(accepted) == summary["accepted"], name
        assert sorted(quarantine["row"].tolist() + accepted["row"].tolist()) == sorted(set(quarantine["row"]) | set(accepted["row"])), name
        assert all(isinstance(d, str) and d for d in quarantine["detail"]), name
        # the in-memory path agrees with the streaming one
        whole = validate_file(path)
        assert whole.summary()["by_reason"] == summary["by_reason"], name


def test_specific_reasons(tmp_path):
    files = corpus(tmp_path)
    by_reason = lambda name: validate_file(files[name]).counts_by_reason()  # noqa: E731
    assert by_reason("invalid_utf8") == {"invalid_text": 3}
    assert by_reason("invalid_utf8_csv") == {"invalid_text": 1}
    assert by_reason("mixed_layouts") == {"layout_mismatch": 2, "unknown_layout": 1}
    assert by_reason("identical_pairs") == {"identical_pair": 2}
    assert by_reason("empty_strings") == {"empty_field": 3}
    assert by_reason("truncated_json_array") == {"invalid_json": 1}
    assert by_reason("deep_nesting") == {"invalid_json": 1}
    assert by_reason("wrong_types") == {"not_an_object": 3, "wrong_type": 3}


@pytest.mark.parametrize("gz", [False, True])
def test_binary_garbage_is_a_clear_file_error(tmp_path, gz):
    data = random.Random(0).randbytes(200_000)
    path = tmp_path / ("garbage.jsonl.gz" if gz else "garbage.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(FeedbackFileError, match="binary data") as info:
        read_feedback_file(path)
    assert info.value.path == str(path)
    a, q = tmp_path / "a.parquet", tmp_path / "q.parquet"
    with pytest.raises(FeedbackFileError):
        validate_file_to_parquet(path, a, q)
    assert not a.exists() and not q.exists() and not list(tmp_path.glob("*.partial"))


def test_other_file_errors(tmp_path):
    fake_parquet = tmp_path / "x.parquet"
    fake_parquet.write_text(pair(), encoding="utf-8")
    with pytest.raises(FeedbackFileError, match="not Parquet"):
        read_feedback_file(fake_parquet)
    corrupt = tmp_path / "y.parquet"
    corrupt.write_bytes(b"PAR1" + b"\x00" * 100)
    with pytest.raises(FeedbackFileError, match="Parquet"):
        read_feedback_file(corrupt)
    bad_gzip = tmp_path / "z.jsonl.gz"
    bad_gzip.write_bytes(gzip.compress((pair() + "\n").encode() * 5000)[:500])
    a = tmp_path / "a.parquet"
    with pytest.raises(FeedbackFileError, match="gzip"):
        validate_file_to_parquet(bad_gzip, a, tmp_path / "q.parquet", chunk_rows=100_000)
    assert not a.exists()


def test_ten_megabyte_single_line(tmp_path):
    path = tmp_path / "huge.jsonl"
    huge = pair(prompt="Long one?", chosen="x " * 5_000_000)
    path.write_text(huge + "\n" + pair() + "\n", encoding="utf-8")
    assert path.stat().st_size > 10_000_000
    start = time.perf_counter()
    summary = validate_file_to_parquet(path, tmp_path / "a.parquet", tmp_path / "q.parquet", ValidationRules(pii="quarantine"))
    assert time.perf_counter() - start < 15
    assert summary["by_reason"] == {"too_long": 1} and summary["accepted"] == 1
    raw = pd.read_parquet(tmp_path / "q.parquet")["raw"].iloc[0]
    assert len(raw) == 2000
