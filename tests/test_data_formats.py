"""Importer: file formats (JSONL, JSON, CSV/TSV, Parquet, gzip) and row layouts of every kind."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from alignment_pipelines.data.ingest.chunks import iter_feedback_chunks, read_feedback_file

from alignment_pipelines.data.ingest.formats import FeedbackFileError

from alignment_pipelines.data.ingest.layouts import LAYOUTS
from alignment_pipelines.data.schemas import COLUMNS_BY_KIND

PAIRS = [
    {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."},
    {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Paris."},
    {"prompt": "Colour of the sky?", "chosen": "Blue.", "rejected": "Green."},
]
USER = [{"role": "user", "content": "What is 2 + 2?"}]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def reasons(result) -> dict[int, str]:
    return {int(r): str(x) for r, x in zip(result.rejected["row"], result.rejected["reason"])}


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json", "json.gz", "csv", "csv.gz", "tsv", "parquet", "parquet.gz"])
def test_every_format_reads_the_same_pairs(tmp_path, fmt):
    path = tmp_path / f"pairs.{fmt}"
    base = fmt.removesuffix(".gz")
    if base == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in PAIRS).encode()
    elif base == "json":
        data = json.dumps(PAIRS, indent=2).encode()
    elif base in ("csv", "tsv"):
        out = tmp_path / "tmp.csv"
        with open(out, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"], delimiter="\t" if base == "tsv" else ",")
            writer.writeheader()
            writer.writerows(PAIRS)
        data = out.read_bytes()
    else:
        pd.DataFrame(PAIRS).to_parquet(tmp_path / "tmp.parquet")
        data = (tmp_path / "tmp.parquet").read_bytes()
    path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    result = read_feedback_file(path)
    assert (result.kind, result.layout, result.rows, len(result.rejected)) == ("pairwise", "pairwise", 3, 0)
    assert result.records["chosen"].tolist() == ["4.", "Lima.", "Blue."]
    assert result.records.iloc[1]["prompt"] == [{"role": "user", "content": "Capital of Peru?"}]
    expected_rows = {"csv": [2, 3, 4], "tsv": [2, 3, 4]}.get(base, [1, 2, 3])  # CSV: file line of the record
    assert result.records["row"].tolist() == expected_rows


def test_json_object_with_rows_and_truncated_array(tmp_path):
    obj = tmp_path / "wrapped.json"
    obj.write_text(json.dumps({"version": 1, "data": PAIRS}), encoding="utf-8")
    assert len(read_feedback_file(obj).records) == 3

    truncated = tmp_path / "truncated.json"
    truncated.write_text(json.dumps(PAIRS)[:-40], encoding="utf-8")  # cut inside the third element
    result = read_feedback_file(truncated)
    assert result.rows == 3 and result.records["row"].tolist() == [1, 2]
    assert reasons(result) == {3: "invalid_json"}

    missing_comma = tmp_path / "broken.json"
    missing_comma.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"} {"x": 1}]', encoding="utf-8")
    result = read_feedback_file(missing_comma)
    assert result.rows == 2 and reasons(result) == {2: "invalid_json"}


def test_csv_message_cells_labels_and_ragged_rows(tmp_path):
    path = tmp_path / "binary.csv"
    path.write_text(
        "prompt,completion,label\n"
        '"Hi?","Hello, friend.",true\n'
        '"[{""role"": ""user"", ""content"": ""Bye?""}]","Bye.",FALSE\n'
        '"Multi\nline?","Yes.",maybe\n'
        '"too","many","fields",here\n',
        encoding="utf-8",
    )
    result = read_feedback_file(path)
    assert (result.kind, result.layout) == ("binary", "binary")
    assert list(result.records.columns) == COLUMNS_BY_KIND["binary"]
    assert result.records["label"].tolist() == [True, False, "maybe"]  # "maybe" fails the suite later
    assert result.records.iloc[1]["prompt"] == [{"role": "user", "content": "Bye?"}]
    assert result.records["row"].tolist() == [2, 3, 4]
    assert reasons(result) == {6: "malformed_row"}


def test_trl_and_other_layouts(tmp_path):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    cases = {
        "binary": ("binary", {"prompt": "Hi", "completion": "Hello!", "label": True}),
        "binary-conv": ("binary", {"prompt": conv[:1], "completion": conv[1:], "label": False}),
        "chat-log": ("binary", {"messages": conv, "feedback": "thumbs_down"}),
        "messages": ("prompts", {"messages": conv + [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Hello!"}]}),
        "prompts": ("prompts", {"prompt": "Tell me a joke."}),
        "ultrafeedback": (
            "pairwise",
            {
                "instruction": "Hi",
                "completions": [
                    {"response": "meh", "overall_score": 5.0},
                    {"response": "Hello!", "overall_score": 9},
                    {"response": "go away", "overall_score": 2},
                    {"response": "ok", "overall_score": "7"},
                ],
            },
        ),
        "ultrafeedback-lists": ("pairwise", {"prompt": "Hi", "responses": ["a", "b"], "scores": [1, 3]}),
    }
    for name, (kind, row) in cases.items():
        result = read_feedback_file(jsonl(tmp_path / f"{name}.jsonl", [row]))
        assert result.kind == kind, name
        assert result.layout == name.removesuffix("-conv").removesuffix("-lists"), name
        assert list(result.records.columns) == COLUMNS_BY_KIND[kind], name
        assert len(result.records) == 1, (name, result.rejected.to_dict("records"))
        rec = result.records.iloc[0]
        if name == "chat-log":
            assert (rec["prompt"], rec["completion"], rec["label"]) == (conv[:1], "Hello!", False)
        if name == "messages":
            assert [m["content"] for m in rec["prompt"]] == ["Hi", "Hello!", "Again?"]
        if name == "ultrafeedback":
            assert (rec["chosen"], rec["rejected"]) == ("Hello!", "go away")
        if name == "ultrafeedback-lists":
            assert (rec["chosen"], rec["rejected"]) == ("b", "a")


def test_layout_row_errors(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "thumbs": "up"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "thumbs": "sideways"},
        {"messages": [{"role": "user", "content": "Hi"}], "thumbs": True},  # no rated answer
        {"messages": "Hi", "thumbs": True},
    ]
    result = read_feedback_file(jsonl(tmp_path / "chat.jsonl", rows))
    assert result.layout == "chat-log" and result.records["label"].tolist() == [True]
    assert reasons(result) == {2: "wrong_type", 3: "invalid_conversation", 4: "wrong_type"}

    uf = [
        {"instruction": "Q", "completions": [{"response": "a", "overall_score": 3}, {"response": "b", "overall_score": 3}]},
        {"instruction": "Q", "completions": [{"response": "a", "overall_score": 3}]},
        {"instruction": "Q", "completions": [{"response": "a", "overall_score": "high"}, {"response": "b", "overall_score": 1}]},
        {"completions": [{"response": "a", "overall_score": 1}, {"response": "b", "overall_score": 2}]},
    ]
    result = read_feedback_file(jsonl(tmp_path / "uf.jsonl", uf))
    assert result.layout == "ultrafeedback" and result.records.empty
    assert reasons(result) == {1: "no_preference", 2: "missing_field", 3: "wrong_type", 4: "missing_field"}


def test_mixed_layouts_majority_wins_and_minority_is_quarantined(tmp_path):
    rows = [
        PAIRS[0],
        {"prompt": "Hi", "completion": "Hello", "label": True},  # binary in a pairwise file
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "b"}]},  # same kind: kept
        PAIRS[1],
        {"prompt": "just a prompt"},
        {"foo": 1, "bar": 2},
    ]
    result = read_feedback_file(jsonl(tmp_path / "mixed.jsonl", rows))
    assert (result.kind, result.layout) == ("pairwise", "pairwise")
    assert result.records["row"].tolist() == [1, 3, 4]
    assert reasons(result) == {2: "layout_mismatch", 5: "layout_mismatch", 6: "unknown_layout"}
    detail = result.rejected.set_index("row").loc[2, "detail"]
    assert "binary" in detail and "pairwise" in detail
    assert "bar, foo" in result.rejected.set_index("row").loc[6, "detail"]

    # the override wins over the majority
    forced = read_feedback_file(tmp_path / "mixed.jsonl", layout="binary")
    assert forced.kind == "binary" and forced.records["row"].tolist() == [2]
    assert forced.rows == 6 and len(forced.rejected) == 5


def test_unknown_layout_file_and_bad_override(tmp_path):
    path = jsonl(tmp_path / "other.jsonl", [{"question": "q", "answer": "a"}, {"question": "r", "answer": "b", "id": 3}])
    with pytest.raises(FeedbackFileError) as info:
        read_feedback_file(path)
    message = str(info.value)
    assert str(path) in message and "answer" in message and "question" in message and "id" in message
    assert all(name in message for name in LAYOUTS)
    with pytest.raises(ValueError, match="hh-rlhf"):
        read_feedback_file(path, layout="nonsense")


def test_empty_and_all_unparseable_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n", encoding="utf-8")
    result = read_feedback_file(empty)
    assert result.rows == 0 and result.records.empty
    garbage_text = tmp_path / "text.jsonl"
    garbage_text.write_text("not json\n{broken\n", encoding="utf-8")
    result = read_feedback_file(garbage_text)
    assert result.rows == 2 and result.layout == "none" and reasons(result) == {1: "invalid_json", 2: "invalid_json"}


def test_chunks_have_global_row_numbers_and_layout_from_first_chunk(tmp_path):
    rows = [{"prompt": f"P{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(10)]
    rows.insert(0, {"nothing": "known"})
    rows.insert(1, {"also": "unknown"})
    path = jsonl(tmp_path / "many.jsonl", rows)
    chunks = list(iter_feedback_chunks(path, chunk_rows=2))  # first chunk has no known layout: buffered
    assert [c.rows for c in chunks] == [2, 2, 2, 2, 2, 2]
    assert all(c.kind == "pairwise" for c in chunks)
    assert [r for c in chunks for r in c.records["row"]] == list(range(3, 13))
    assert reasons(chunks[0]) == {1: "unknown_layout", 2: "unknown_layout"}
    whole = read_feedback_file(path)
    assert whole.records["row"].tolist() == list(range(3, 13))
    with pytest.raises(ValueError):
        next(iter_feedback_chunks(path, chunk_rows=0))


def test_csv_edge_cases(tmp_path):
    header_only = tmp_path / "h.csv"
    header_only.write_text("prompt,chosen,rejected\n", encoding="utf-8")
    assert read_feedback_file(header_only).rows == 0
    unknown = tmp_path / "u.csv"
    unknown.write_text("question,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(FeedbackFileError, match="answer, question|question, answer"):
        read_feedback_file(unknown)
    huge_cell = tmp_path / "big.csv"
    huge_cell.write_text("prompt,chosen,rejected\n" + '"p","' + "x" * 300_000 + '","r"\n', encoding="utf-8")
    assert len(read_feedback_file(huge_cell).records.iloc[0]["chosen"]) == 300_000
