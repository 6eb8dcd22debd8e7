"""Token counts: the fast path (pieces cut on the bytes, but not inside whitespace runs; digits counted as "0")
gives the tokenizer's own count of each whole text, on real human transcripts made hostile (tabs,
newlines, Unicode spaces, digits beside other scripts, emoji, CJK, ends cut anywhere), with SmolLM2's
tokenizer, one that merges digits, one whose " 5" differs from " 3", and one that is not piecewise."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from alignment_pipelines.data.validate import tokens
from alignment_pipelines.data.validate.tokens import TokenCounter

HH_FILE = Path(__file__).parents[1].parent / "shared/data/hh-rlhf-harmless-base.jsonl.gz"
INSERTS = ["\t", "\n", "\r\n", "\x0b", "\x1c", "\x01", "\u00a0", "\u3000", "\u2009", "\u0085", "\u1680", "\u2028",
           "\u202f", "\u205f", "  ", " ", "12345", "2023-01-05", "$1,234.56", " 42", "#50000", "v2.1", " 007", "1e10",
           "😀", "🙂 ok", "日本語", "中文 测试", "²", "١٢٣", "３", " 5²", "5 ", "é5", "5é", "x\u00a05", "5\u00a0", "'s",
           " 's", "<|im_end|>"]


def _texts(limit: int) -> list[str]:
    """Transcripts, prompts, turns of the HH file, each also with hostile inserts and cut at random ends."""
    whole = []
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        for line in f:
            for transcript in json.loads(line).values():
                turns = [t for part in transcript.split("\n\nHuman:") for t in part.split("\n\nAssistant:")]
                whole += [transcript, transcript[: transcript.rfind("\n\nAssistant:")]] + [t.strip() for t in turns]
            if len(whole) >= limit:
                break
    rng = random.Random(7)
    texts = list(whole)
    for text in whole:
        chars = list(text)
        for _ in range(rng.randint(1, 6)):
            chars.insert(rng.randint(0, len(chars)), rng.choice(INSERTS))
        mutated = "".join(chars)
        i, j = sorted(rng.randint(0, len(mutated)) for _ in range(2))
        texts += [mutated, mutated[i:j]]
    return texts + ["", " ", "5", " 5", "55", "a5", " 0 ", "١٢", "٣4", "4٣", "²5", "5²"]


@pytest.fixture(scope="module")
def hh_texts() -> list[str]:
    if not HH_FILE.exists():
        pytest.skip("../shared/data is not beside the project")
    return _texts(2000)


def _bpe(tmp_path: Path, name: str, merges: list[tuple[str, str]], **pre) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(**pre)
    tok.save(str(tmp_path / f"{name}.json"))
    return tmp_path / f"{name}.json"


def _assert_exact(counter: TokenCounter, texts: list[str]) -> None:
    expected = counter.encode_counts(texts)
    arr = pa.array(texts)
    got = counter.count(arr)
    assert got.dtype == np.int64
    assert np.flatnonzero(got != expected).tolist() == []
    assert counter.count(arr).tolist() == expected.tolist()  # the pieces now remembered
    assert counter.count(arr.slice(101, 3000)).tolist() == expected[101:3101].tolist()
    assert counter.count(pa.chunked_array([arr.slice(0, 777), arr.slice(777)])).tolist() == expected.tolist()
    assert counter.count(texts[:50] + [None]).tolist() == expected[:50].tolist() + [0]


def test_smollm2_counts_of_real_transcripts_are_exact(smollm2_tokenizer, hh_texts):
    counter = TokenCounter(smollm2_tokenizer)
    assert counter.piecewise and counter._digits is not None
    _assert_exact(counter, hh_texts)


@pytest.mark.parametrize("name, merges, pre, digits", [
    ("merges-digits", [("1", "2"), ("12", "3"), ("Ġ", "1")], {"add_prefix_space": False}, False),
    ("space-five", [("Ġ", "5"), ("e", "s")], {"add_prefix_space": False}, True),  # " 5" one token, " 3" two
    ("prefix-space", [("Ġ", "5")], {"add_prefix_space": True}, False),  # not piecewise: whole texts
])
def test_other_tokenizers_counts_of_real_transcripts_are_exact(tmp_path, hh_texts, name, merges, pre, digits):
    counter = TokenCounter(_bpe(tmp_path, name, merges, **pre))
    assert counter.piecewise == (name != "prefix-space") and (counter._digits is not None) == digits
    _assert_exact(counter, hh_texts)


def test_spaces_inside_whitespace_runs_are_the_ones_python_finds(hh_texts):
    """A space is not cut at when the character before it and the one after it (or the text's end, or an
    added token's first byte) are whitespace by str.isspace()."""
    ends_run = tokens._ASCII_SPACE.copy()
    ends_run[ord("<")] = True  # as for a tokenizer with "<|im_end|>" among its added tokens
    texts = hh_texts[3:]
    expected = []
    for text in texts:
        data = text.encode()
        starts = np.cumsum([0] + [len(c.encode()) for c in text])
        for i, c in enumerate(text):
            if c == " ":
                after = text[i + 1] if i + 1 < len(text) else None
                expected.append(i > 0 and text[i - 1].isspace() and (
                    after is None or after.isspace() or bool(ends_run[data[starts[i + 1]]])))
    arr = pa.array(texts)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
    raw = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
    spaces = np.flatnonzero(raw == 0x20)
    found = np.isin(spaces, tokens._spaces_inside_runs(raw, offsets - offsets[0], ends_run))
    assert found.sum() > 100 and found.tolist() == expected


def test_the_whitespace_set_is_pythons():
    assert tokens.PY_WHITESPACE == "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
