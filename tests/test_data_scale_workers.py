"""Feedback at scale, part two: the worker processes and the token counts of numbers.

- a JSONL file assessed by worker processes (and by this one, which takes chunks back) gives byte for byte the outputs of the one-process path (and so
  of the row-by-row reference, which `test_data_at_scale` compares that path with), the byte ranges the
  workers read holding exactly the lines of the one-process chunks;
- runs of digits are counted without the tokenizer only where it never merges two digits, and the counts
  are the tokenizer's own either way.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from alignment_pipelines.data.ingest import jsonl_fast

from alignment_pipelines.data.validate import engine as validation
from alignment_pipelines.data.validate.tokens import TokenCounter
from alignment_pipelines.data.validate.engine import validate_file_to_parquet
from alignment_pipelines.data.validate.rules import ValidationRules
from tests.test_data_at_scale import HOSTILE, _write, conv


def _outputs(tmp_path: Path, path: Path, name: str, rules: ValidationRules, **kw) -> tuple[dict, list]:
    out = tmp_path / name
    summary = validate_file_to_parquet(path, out / "a.parquet", out / "q.parquet", rules, chunk_rows=16,
                                       keys_path=out / "k.parquet", **kw)
    return summary, [pd.read_parquet(out / f) for f in ("a.parquet", "q.parquet", "k.parquet")]


def _lines() -> list[str]:
    rng = random.Random(11)
    lines = []
    for i in range(400):
        lines.append(json.dumps(conv(f"#{i} Question {i % 50}?", f"Answer {i % 9}.", f"Other {i % 13}.")))
        if rng.random() < 0.15:
            lines.append(rng.choice(HOSTILE))
    return lines


@pytest.mark.parametrize("layout", [None, "conversational"])
def test_workers_give_the_outputs_of_one_process(tmp_path, monkeypatch, smollm2_tokenizer, layout):
    path = _write(tmp_path / "batch.jsonl", _lines())
    rules = ValidationRules(max_chars=100, tokenizer=str(smollm2_tokenizer))
    monkeypatch.setattr(validation, "PARALLEL_MIN_BYTES", 0)
    one, one_files = _outputs(tmp_path, path, "one", rules, layout=layout, workers=1)
    assert one["quarantined"] > 40 and one["chunks"] > 20
    for workers in (2, 3):  # one worker process and this one; two and this one
        many, many_files = _outputs(tmp_path, path, f"many{workers}", rules, layout=layout, workers=workers)
        assert many == {**one, "source": many["source"]}
        for a, b in zip(one_files, many_files):
            pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("text", ["", "\n\n  \n", "not json\n{broken\n", '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'])
def test_workers_route_a_file_without_a_layout(tmp_path, monkeypatch, text):
    """A large file of nothing but blank or broken lines has no layout: its chunks are converted here."""
    path = tmp_path / "batch.jsonl"
    path.write_text(text)
    monkeypatch.setattr(validation, "PARALLEL_MIN_BYTES", 0)
    one, one_files = _outputs(tmp_path, path, "one", ValidationRules(), workers=1)
    many, many_files = _outputs(tmp_path, path, "many", ValidationRules(), workers=2)
    assert many == {**one, "source": many["source"]}
    for a, b in zip(one_files, many_files):
        pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("block_bytes", [64, 16 << 20])
def test_byte_ranges_hold_the_lines_of_the_chunks(tmp_path, monkeypatch, block_bytes):
    """Blank and whitespace-led lines, invalid UTF-8, a BOM, CRLF, no final newline, blocks cutting lines."""
    monkeypatch.setattr(jsonl_fast, "BLOCK_BYTES", block_bytes)
    rng = random.Random(3)
    parts = [b'{"a": 1}', b"", b"  ", b"\t\r", b" x", b"\xff\xfe", b"\xc3\xa9", b"\x0b", b"\xef\xbb\xbf{}", b"\r",
             json.dumps(conv("q", "a", "b")).encode()]
    for k in range(60):
        path = tmp_path / f"{k}.jsonl"
        path.write_bytes(b"\n".join(rng.choice(parts) for _ in range(rng.randint(0, 60))) + rng.choice([b"", b"\n", b" "]))
        for chunk_rows in (1, 3, 8, 1000):
            chunks = list(jsonl_fast._row_chunks(path, chunk_rows))
            ranges = [r.read()[0] for r in jsonl_fast._range_chunks(path, chunk_rows)]
            assert [c.rows.tolist() for c in chunks] == [r.rows.tolist() for r in ranges]
            assert [c.text.to_pylist() for c in chunks] == [r.text.to_pylist() for r in ranges]
            assert [c.bad_utf8 for c in chunks] == [r.bad_utf8 for r in ranges]


def _digit_texts() -> list[str]:
    rng = random.Random(5)
    alphabet = (list("0123456789 .,#$-/:ab Zé\n\t") + ["١٢٣", "３", "²", " 0", "007", "1e10", "12:30", "v2.1", "#42"])
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(4000)]


def test_digit_runs_counted_without_the_tokenizer_are_exact(smollm2_tokenizer):
    counter = TokenCounter(smollm2_tokenizer)
    assert counter._digits is not None  # SmolLM2 has no token of two digits
    texts = _digit_texts()
    assert counter.count(pa.array(texts)).tolist() == counter.encode_counts(texts).tolist()


def test_a_tokenizer_that_merges_digits_is_asked(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [("1", "2"), ("12", "3"), ("Ġ", "1")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    counter = TokenCounter(tmp_path / "tokenizer.json")
    assert counter.piecewise and counter._digits is None
    texts = _digit_texts() + ["123123", " 1234", "#123", "a12 3"]
    assert counter.count(pa.array(texts)).tolist() == counter.encode_counts(texts).tolist()
