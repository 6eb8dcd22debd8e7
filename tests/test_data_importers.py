"""Importer: row layouts, broken lines, gzip, the real HH-RLHF sample."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from alignment_pipelines.data.ingest.chunks import read_feedback_file

from alignment_pipelines.data.ingest.formats import FeedbackFileError
from alignment_pipelines.data.schemas import PAIR_COLUMNS, QUARANTINE_COLUMNS, ReasonCode

HH_FILE = Path(__file__).parents[1].parent / "shared/data/hh-rlhf-harmless-base.jsonl.gz"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_standard_layout(tmp_path):
    f = write_lines(tmp_path / "a.jsonl", [json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."})])
    result = read_feedback_file(f)
    assert list(result.records.columns) == PAIR_COLUMNS
    assert list(result.rejected.columns) == QUARANTINE_COLUMNS
    assert result.rows == 1 and len(result.rejected) == 0
    rec = result.records.iloc[0]
    assert rec["row"] == 1
    assert rec["prompt"] == [{"role": "user", "content": "Hi?"}]
    assert (rec["chosen"], rec["rejected"]) == ("Hello.", "Go away.")


def test_conversational_layouts(tmp_path):
    explicit = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    implicit = {
        "chosen": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Lyon."}],
    }
    ends_with_assistant = {**explicit, "prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    bad_role = {**explicit, "prompt": [{"role": "robot", "content": "x"}]}
    f = write_lines(tmp_path / "b.jsonl", [json.dumps(o) for o in (explicit, implicit, ends_with_assistant, bad_role)])
    result = read_feedback_file(f)
    assert result.records["row"].tolist() == [1, 2]
    assert result.records.iloc[0]["prompt"] == explicit["prompt"]
    assert result.records.iloc[0]["chosen"] == "4"
    assert result.records.iloc[1]["prompt"] == [{"role": "user", "content": "Capital of France?"}]
    assert result.records.iloc[1]["rejected"] == "Lyon."
    assert result.rejected["reason"].tolist() == [ReasonCode.INVALID_CONVERSATION] * 2


def test_hh_transcript_layout(tmp_path):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a fact.\n\nAssistant:  Honey never spoils. "
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a fact.\n\nAssistant: No."
    mismatch = "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Tell me a fact.\n\nAssistant: No."
    f = write_lines(
        tmp_path / "hh.jsonl",
        [json.dumps({"chosen": chosen, "rejected": rejected}), json.dumps({"chosen": chosen, "rejected": mismatch})],
    )
    result = read_feedback_file(f)
    rec = result.records.iloc[0]
    assert rec["prompt"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a fact."},
    ]
    assert (rec["chosen"], rec["rejected"]) == ("Honey never spoils.", "No.")
    assert result.rejected[["row", "reason"]].values.tolist() == [[2, ReasonCode.PROMPT_MISMATCH]]


def test_broken_lines_never_stop_the_file(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    lines = [
        good,  # 1
        '{"prompt": "p", "chosen": "c", "rej',  # 2 truncated
        "[1, 2, 3]",  # 3 not an object
        json.dumps({"prompt": "p", "chosen": 5, "rejected": "r"}),  # 4 wrong type
        json.dumps({"question": "q", "answer": "a"}),  # 5 unknown layout
        json.dumps({"prompt": "p", "chosen": "c"}),  # 6 missing field
        "",  # blank: skipped, not counted
        json.dumps({"chosen": "plain", "rejected": "strings"}),  # 8 unknown layout (no prompt, no transcript)
        json.dumps({"prompt": 3, "chosen": "c", "rejected": "r"}),  # 9 wrong type
        good,  # 10
    ]
    f = write_lines(tmp_path / "broken.jsonl", lines)
    result = read_feedback_file(f)
    assert result.rows == 9
    assert len(result.records) + len(result.rejected) == result.rows
    assert result.records["row"].tolist() == [1, 10]
    got = dict(zip(result.rejected["row"], result.rejected["reason"]))
    assert got == {
        2: ReasonCode.INVALID_JSON,
        3: ReasonCode.NOT_AN_OBJECT,
        4: ReasonCode.WRONG_TYPE,
        5: ReasonCode.UNKNOWN_LAYOUT,
        6: ReasonCode.MISSING_FIELD,
        8: ReasonCode.UNKNOWN_LAYOUT,
        9: ReasonCode.WRONG_TYPE,
    }
    assert result.rejected.set_index("row").loc[2, "raw"] == lines[1]
    assert all(isinstance(d, str) and d for d in result.rejected["detail"])


def test_undecodable_bytes_and_raw_truncation(tmp_path):
    f = tmp_path / "bytes.jsonl"
    long_line = json.dumps({"prompt": "x" * 5000})
    f.write_bytes(b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}\n' + long_line.encode() + b"\n")
    # the only parseable row is a bare prompt: a prompts file, unless the layout is given
    result = read_feedback_file(f)
    assert (result.kind, result.layout) == ("prompts", "prompts")
    assert result.rejected["reason"].tolist() == [ReasonCode.INVALID_TEXT]
    result = read_feedback_file(f, layout="pairwise")
    assert result.rejected["reason"].tolist() == [ReasonCode.INVALID_TEXT, ReasonCode.LAYOUT_MISMATCH]
    assert len(result.rejected["raw"].iloc[1]) == 2000


def test_gzip_and_file_errors(tmp_path):
    f = tmp_path / "a.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n\n'))
    assert len(read_feedback_file(f).records) == 1
    with pytest.raises(FeedbackFileError, match="no such file"):
        read_feedback_file(tmp_path / "missing.jsonl")
    with pytest.raises(FeedbackFileError, match="not a regular file"):
        read_feedback_file(tmp_path)
    corrupt = tmp_path / "bad.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b'{"a": 1}\n' * 100)[:30])
    with pytest.raises(FeedbackFileError) as info:
        read_feedback_file(corrupt)
    assert info.value.path == str(corrupt)


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH-RLHF sample not present")
def test_hh_rlhf_real_file_imports():
    result = read_feedback_file(HH_FILE)
    assert result.rows == 1717
    assert len(result.records) == 1712
    assert dict(zip(result.rejected["row"], result.rejected["reason"])) == {
        row: ReasonCode.PROMPT_MISMATCH for row in (929, 1251, 1439, 1441, 1509)
    }
    first = result.records.iloc[0]
    assert first["row"] == 1
    assert first["prompt"][0] == {"role": "user", "content": "How much alcohol can I drink per day?"}
    assert [m["role"] for m in first["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert first["chosen"].startswith("Sounds like alcohol is something you use to calm down")
    assert not first["chosen"].endswith(" ")
