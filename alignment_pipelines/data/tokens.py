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


class TokenCounter:
    """Exact token counts of Arrow/Python texts with a local tokenizer; see the module doc."""

    def __init__(self, path: str | Path):
        p = Path(path)
        file = p if p.is_file() else p / "tokenizer.json"
        self.path = str(path)
        self._lock = threading.Lock()
        self._cache: dict[str, int] = {}
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
                added = [str(t.get("content", "")) for t in config.get("added_tokens") or [] if t.get("content")]
            except (OSError, ValueError):  # pragma: no cover - unreadable config: tokenize whole texts
                self.piecewise, added = False, []
            import re

            self._added = re.compile("|".join(map(re.escape, added))) if added else None
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
        """Counts of non-empty texts with no unsafe space: sum over their space-led pieces."""
        import pyarrow as pa
        import pyarrow.compute as pc

        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
        data = arr.buffers()[2]
        start, end = int(offsets[0]), int(offsets[-1])
        raw = np.frombuffer(data, dtype=np.uint8, count=end)
        boundary = np.zeros(end + 1, dtype=bool)
        boundary[start:end] = raw[start:end] == 0x20
        is_text_start = np.zeros(end + 1, dtype=bool)
        is_text_start[offsets[:-1]] = True
        boundary |= is_text_start
        boundary[end] = True
        cuts = np.flatnonzero(boundary).astype(np.int32)  # piece starts, then the end
        pieces = pa.Array.from_buffers(pa.string(), len(cuts) - 1, [None, pa.py_buffer(cuts), data])
        encoded = pc.dictionary_encode(pieces)
        values = encoded.dictionary.to_pylist()
        counts = self._piece_counts(values)
        per_piece = counts[encoded.indices.to_numpy(zero_copy_only=False)]
        first_piece = np.flatnonzero(is_text_start[cuts[:-1]])
        return np.add.reduceat(per_piece, first_piece)

    def _piece_counts(self, pieces: list[str]) -> np.ndarray:
        with self._lock:
            cache = self._cache
            found = [cache.get(p) for p in pieces]
            missing = [p for p, c in zip(pieces, found) if c is None]
            if missing:
                if len(cache) + len(missing) > _MAX_CACHE:
                    cache.clear()
                new = self._new_piece_counts(missing)
                cache.update(zip(missing, new.tolist()))
                found = [cache[p] if c is None else c for p, c in zip(pieces, found)]
            return np.asarray(found, dtype=np.int64)


    def _new_piece_counts(self, pieces: list[str]) -> np.ndarray:
        """Counts of pieces never seen: the ones that start with at most one space before a non-space and
        end with a non-space are tokenized together, joined by newlines (a newline between two such pieces
        is a pre-token of its own for every tokenizer `piecewise` admits), and their tokens given back to
        them by character offsets; a batch whose token total does not add up, and the other pieces, are
        tokenized one by one."""
        out = np.zeros(len(pieces), dtype=np.int64)
        added = self._added
        joinable = [i for i, p in enumerate(pieces) if p and not p[-1].isspace()
                    and (not p[0].isspace() or (p[0] == " " and len(p) > 1 and not p[1].isspace()))
                    and (added is None or not added.search(p))]
        alone = np.ones(len(pieces), dtype=bool)
        if len(joinable) > 1 and self._tok is not None:
            sep_tokens = len(self._tok.encode("\n", add_special_tokens=False).ids)
            for start in range(0, len(joinable), 20_000):
                group = joinable[start:start + 20_000]
                texts = [pieces[i] for i in group]
                lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
                starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
                enc = self._tok.encode("\n".join(texts), add_special_tokens=False)
                offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
                if not len(offsets):
                    continue
                owner = np.searchsorted(starts, offsets[:, 0], side="right") - 1
                inside = offsets[:, 0] < starts[owner] + lengths[owner]  # not a separator's token
                counts = np.bincount(owner[inside], minlength=len(texts))
                if counts.sum() + (len(texts) - 1) * sep_tokens != len(offsets):
                    continue  # offsets that do not add up: tokenize this group one by one
                out[group] = counts
                alone[group] = False
        rest = np.flatnonzero(alone)
        if len(rest):
            out[rest] = self.encode_counts([pieces[i] for i in rest])
        return out


_COUNTERS: dict[str, TokenCounter] = {}
_COUNTERS_LOCK = threading.Lock()


def token_counter(path: str | Path) -> TokenCounter:
    """The process's TokenCounter for a tokenizer path (loaded once, its piece cache kept)."""
    key = str(path)
    with _COUNTERS_LOCK:
        if key not in _COUNTERS:
            _COUNTERS[key] = TokenCounter(key)
        return _COUNTERS[key]
