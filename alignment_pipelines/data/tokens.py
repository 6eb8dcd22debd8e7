"""Token counts of many texts at once: exact, and fast for the tokenizers most models use.

`TokenCounter(path).count(texts)` gives the number of tokens each text has with the tokenizer at
`path` (a tokenizer folder or a tokenizer.json), without special tokens: the same numbers as
``len(tokenizer.encode(text, add_special_tokens=False).ids)``.

How it is fast. A tokenizer whose pre-tokenizer never lets a token run across a space that stands
between two non-space characters (GPT-2-style byte-level BPE, whitespace and BERT pre-tokenizers)
tokenizes each space-separated piece of a text (" world," with its leading space) independently: the
count of a text is the sum of the counts of its pieces. The pieces are cut with numpy on the Arrow
buffer (no copy), counted once per distinct piece with the real tokenizer and remembered, so that a
batch costs one dictionary encode of its pieces plus the new pieces' tokenization. A text where that
cut is not safe (a space next to other whitespace, at either end) is tokenized whole, as is every
text when the tokenizer is not one of those families. Either way the count is the tokenizer's own.

Numbers, the usual never-seen pieces (ids, dates, amounts), need no tokenizer call with a byte-level BPE
that never merges two digits (checked on its vocabulary when loaded): its GPT-2 pattern makes a run of
ASCII digits a pre-token of its own, so the run is cut from the ASCII around it and counts one token a
digit (the first one with the space before it, if the vocabulary has that pair).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

# every character Python's str.isspace() accepts (what the `\s` of the rules and str.strip mean)
PY_WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
_WS_CLASS = "".join(("\\" + c) if c in "\\]^-[" else c for c in PY_WHITESPACE)
# a space with other whitespace beside it, or at either end: the piece cut is not safe there
UNSAFE_SPACE = f"^ | $| [{_WS_CLASS}]|[{_WS_CLASS}] "
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_MAX_CACHE = 300_000  # pieces remembered (~40 MB); past it the cache starts over
_DIGITS = "0123456789"
_OTHER, _ASCII = 0, 1  # byte kinds: _ASCII is ASCII other than digits and whitespace
_BYTE_KIND = np.array([_ASCII if b < 0x80 and chr(b) not in _DIGITS and not chr(b).isspace() else _OTHER
                       for b in range(256)], dtype=np.uint8)


def _splittable(config: dict) -> bool:
    """Whether a tokenizer.json's pipeline tokenizes space-separated pieces independently."""
    if config.get("normalizer") not in (None, {"type": "NFC"}):
        return False
    model = config.get("model") or {}
    if model.get("type") not in ("BPE", "WordLevel", "WordPiece", "Unigram") or model.get("dropout"):
        return False
    for token in config.get("added_tokens") or []:
        content = str(token.get("content", ""))
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word") or any(c.isspace() for c in content):
            return False
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return not pre.get("add_prefix_space") and pre.get("use_regex", True)
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        # Split(GPT-2 pattern, Isolated) followed by ByteLevel without its own regex
        if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
            pattern = (steps[0].get("pattern") or {}).get("Regex")
            return (pattern == _GPT2_PATTERN and steps[0].get("behavior") == "Isolated"
                    and not steps[0].get("invert") and not steps[1].get("add_prefix_space")
                    and not steps[1].get("use_regex", True))
        return False
    return pre.get("type") in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer")


def _digit_counts(tok, config: dict) -> np.ndarray | None:
    """Tokens of " 0" … " 9" when the tokenizer never merges two digits (no token holds two, no added token
    any): then a run of n digits is n tokens, and n - 1 + tokens(" " + first digit) after a space."""
    if (config.get("pre_tokenizer") or {}).get("type") not in ("ByteLevel", "Sequence"):
        return None  # of the pre-tokenizers `_splittable` admits, only the GPT-2 pattern cuts digits apart
    if any(sum(c in _DIGITS for c in token) > 1 for token in tok.get_vocab()):
        return None
    if any(c in _DIGITS for t in config.get("added_tokens") or [] for c in str(t.get("content", ""))):
        return None
    if any(len(tok.encode(d, add_special_tokens=False).ids) != 1 for d in _DIGITS):
        return None
    return np.array([len(tok.encode(" " + d, add_special_tokens=False).ids) for d in _DIGITS], dtype=np.int64)


class TokenCounter:
    """Exact token counts of Arrow/Python texts with a local tokenizer; see the module doc."""

    def __init__(self, path: str | Path):
        p = Path(path)
        file = p if p.is_file() else p / "tokenizer.json"
        self.path = str(path)
        self._lock = threading.Lock()
        self._cache: dict[str, int] = {}
        self._digits: np.ndarray | None = None
        if file.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(file))
            tok.no_truncation()
            tok.no_padding()
            self._tok = tok
            self._hf = None
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
                self.piecewise = _splittable(config)
                self._digits = _digit_counts(tok, config) if self.piecewise else None
            except (OSError, ValueError):  # pragma: no cover - unreadable config: tokenize whole texts
                self.piecewise = False
        elif p.is_dir():
            from transformers import AutoTokenizer

            self._tok = None
            self._hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            self.piecewise = False
        else:
            raise FileNotFoundError(f"tokenizer not found: {path} (a tokenizer folder or tokenizer.json)")

    # ------------------------------------------------------------------ whole texts

    def encode_counts(self, texts: list[str]) -> np.ndarray:
        """Counts by tokenizing each text whole (the reference the fast path must equal)."""
        if not texts:
            return np.zeros(0, dtype=np.int64)
        if self._tok is not None:
            encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
            return np.fromiter((len(e) for e in encode(texts, add_special_tokens=False)),
                               dtype=np.int64, count=len(texts))
        ids = self._hf(texts, add_special_tokens=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(texts))

    # ------------------------------------------------------------------ any texts

    def count(self, texts: Any) -> np.ndarray:
        """int64 token count of each text (an Arrow string array, or a list of str)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = texts if isinstance(texts, (pa.Array, pa.ChunkedArray)) else pa.array(list(texts), type=pa.string())
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if arr.type != pa.string():
            arr = arr.cast(pa.string())
        n = len(arr)
        out = np.zeros(n, dtype=np.int64)
        if n == 0:
            return out
        arr = pc.fill_null(arr, "")
        if not self.piecewise:
            out[:] = self.encode_counts(arr.to_pylist())
            return out
        unsafe = pc.match_substring_regex(arr, UNSAFE_SPACE).to_numpy(zero_copy_only=False)
        lengths = pc.binary_length(arr).to_numpy(zero_copy_only=False)
        if unsafe.any():
            idx = np.flatnonzero(unsafe)
            out[idx] = self.encode_counts(arr.take(pa.array(idx)).to_pylist())
        safe = np.flatnonzero(~unsafe & (lengths > 0))
        if len(safe):
            out[safe] = self._piecewise_counts(arr.take(pa.array(safe)) if len(safe) < n else arr)
        return out

    def _piecewise_counts(self, arr) -> np.ndarray:
        """Counts of non-empty texts with no unsafe space: sum over their pieces (see the module doc)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
        data = arr.buffers()[2]
        start, end = int(offsets[0]), int(offsets[-1])
        raw = np.frombuffer(data, dtype=np.uint8, count=end)
        boundary = np.zeros(end + 1, dtype=bool)
        boundary[start:end] = raw[start:end] == 0x20
        boundary[offsets] = True
        digits = np.zeros(0, dtype=np.int64)
        if self._digits is not None:  # a run of ASCII digits is a pre-token of its own beside ASCII non-space
            digits = np.flatnonzero((raw[start:end] - np.uint8(0x30)) < 10) + start
            before = raw[np.maximum(digits - 1, 0)]
            after = raw[np.minimum(digits + 1, end - 1)]
            boundary[digits[_BYTE_KIND[before] == _ASCII]] = True
            boundary[digits[(_BYTE_KIND[after] == _ASCII) & (digits + 1 < end)] + 1] = True
        cuts = np.flatnonzero(boundary).astype(np.int32)  # piece starts, then the end
        pieces = pa.Array.from_buffers(pa.string(), len(cuts) - 1, [None, pa.py_buffer(cuts), data])
        encoded = pc.dictionary_encode(pieces)
        indices = encoded.indices.to_numpy(zero_copy_only=False)
        number = np.zeros(len(pieces), dtype=bool)
        per_piece = np.zeros(len(pieces), dtype=np.int64)
        if len(digits):  # pieces of digits alone (after a space or not): counted without the tokenizer
            lead = cuts[:-1]
            n_digits = np.bincount(np.searchsorted(cuts, digits, side="right") - 1, minlength=len(lead))
            spaced = raw[np.minimum(lead, end - 1)] == 0x20
            number = (n_digits > 0) & (n_digits == np.diff(cuts) - spaced)
            first = raw[lead[number] + spaced[number]] - 0x30
            per_piece[number] = n_digits[number] + np.where(spaced[number], self._digits[first] - 1, 0)
        numeric = np.zeros(len(encoded.dictionary), dtype=bool)
        numeric[indices[number]] = True
        words = np.flatnonzero(~numeric)
        counts = np.zeros(len(numeric), dtype=np.int64)
        if len(words):
            counts[words] = self._piece_counts(_subset(encoded.dictionary, words).to_pylist())
        per_piece += counts[indices]
        return np.add.reduceat(per_piece, np.searchsorted(cuts, offsets[:-1]))  # texts are non-empty

    def _piece_counts(self, pieces: list[str]) -> np.ndarray:
        """Counts of distinct pieces: remembered ones from the cache, new ones by the tokenizer (each piece
        encoded alone, in parallel and without the GIL)."""
        with self._lock:
            cache = self._cache
            found = [cache.get(p, -1) for p in pieces]
            missing = [p for p, c in zip(pieces, found) if c < 0]
            if missing:
                if len(cache) + len(missing) > _MAX_CACHE:
                    cache.clear()
                new = self.encode_counts(missing).tolist()
                cache.update(zip(missing, new))
                found = [cache[p] if c < 0 else c for p, c in zip(pieces, found)]
            return np.array(found, dtype=np.int64)


def _subset(arr, index: np.ndarray):
    """arr[index] (sorted indices); no copy when they are all the values."""
    import pyarrow as pa

    return arr if len(index) == len(arr) else arr.take(pa.array(index))


_COUNTERS: dict[str, TokenCounter] = {}
_COUNTERS_LOCK = threading.Lock()


def token_counter(path: str | Path) -> TokenCounter:
    """The process's TokenCounter for a tokenizer path (loaded once, its piece cache kept)."""
    key = str(path)
    with _COUNTERS_LOCK:
        if key not in _COUNTERS:
            _COUNTERS[key] = TokenCounter(key)
        return _COUNTERS[key]
