"""Token counts of many texts at once: exact, and fast for the tokenizers most models use.

`TokenCounter(path).count(texts)` gives the number of tokens each text has with the tokenizer at
`path` (a tokenizer folder or a tokenizer.json), without special tokens: the same numbers as
``len(tokenizer.encode(text, add_special_tokens=False).ids)``.

How it is fast. A text is cut before its spaces into pieces (" world," with its leading space), and its
count is the sum of its pieces' counts. The pieces are cut with numpy on the Arrow buffer (no copy),
counted once per distinct piece with the real tokenizer and remembered, so that a batch costs one lookup
of its pieces plus the new pieces' tokenization. The cut is safe for the tokenizers most models use
(GPT-2-style byte-level BPE, whitespace and BERT pre-tokenizers: `_splittable`) before every space that
does not stand inside a whitespace run, i.e. with whitespace on both sides (after it, a text's end and an
added token such as "<|im_end|>", where the tokenizer cuts the text first, count as whitespace): no
pre-token runs from a non-space character into a following space, and a run of whitespace before a
non-space character leaves its last space to that character ("\n\n How": "\n\n", " How") whether the run
is cut there or not. A space inside a run ("a   b") is not cut at: the GPT-2 pattern keeps the run
together. Any other tokenizer counts whole texts. Either way the count is the tokenizer's own.

Numbers, the usual never-seen pieces (ids, dates, amounts), become pieces seen before with a byte-level BPE
that never merges two digits (no token of its vocabulary holds two, no added token any, each digit alone is
one token: checked when it is loaded). Under its GPT-2 pattern an ASCII digit whose neighbours are ASCII has
no neighbour in its pre-token but digits and the space before it, and no merge joins two digits: the digit is
one token whatever its value, or, after a space, the tokens of " " + it. Such a digit is counted as a "0"
(after a space only when " 0" ... " 9" all count the same), on a copy of the bytes: "#50123" and "#77001"
are the one piece "#00000", tokenized once.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from alignment_pipelines.data import columnar
from alignment_pipelines.data.columnar import PY_WHITESPACE

_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_MAX_CACHE = 300_000  # pieces remembered (~40 MB); past it the cache starts over
_MAX_RECENT = 30_000  # pieces looked up in one pass (each call builds their hash table: ~1 ms)
_DIGITS = "0123456789"
_ASCII_SPACE = np.array([b < 0x80 and chr(b).isspace() for b in range(256)])  # by byte value
_NON_ASCII_SPACES = [np.frombuffer(c.encode(), dtype=np.uint8) for c in PY_WHITESPACE if ord(c) >= 0x80]


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
    any) and each digit alone is one token: then an ASCII digit between ASCII counts the same as a "0"."""
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
        import pyarrow as pa

        p = Path(path)
        file = p if p.is_file() else p / "tokenizer.json"
        self.path = str(path)
        self._lock = threading.Lock()
        self._cache: dict[str, int] = {}
        self._recent = (pa.array([], type=pa.string()), pa.array([], type=pa.int32()))  # see `_counts_of`
        self._digits: np.ndarray | None = None
        self._ends_run = _ASCII_SPACE  # by byte value: what ends a run of whitespace (`_spaces_inside_runs`)
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
                self._ends_run = _ends_run(config)
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
        if len(arr) == 0:
            return np.zeros(0, dtype=np.int64)
        arr = pc.fill_null(arr, "")
        if not self.piecewise:
            return self.encode_counts(arr.to_pylist())
        return self._piecewise_counts(arr)

    def _piecewise_counts(self, arr) -> np.ndarray:
        """Sum over its pieces of each text (see the module doc)."""
        import pyarrow as pa

        raw, offsets = columnar.value_bytes(arr)
        if self._digits is not None:
            raw = _canonical_digits(raw, after_space=bool((self._digits == self._digits[0]).all()))
        boundary = np.zeros(len(raw) + 1, dtype=bool)
        np.equal(raw, 0x20, out=boundary[:-1])
        boundary[_spaces_inside_runs(raw, offsets, self._ends_run)] = False
        boundary[offsets] = True
        # piece starts, then the end twice: a last, empty piece (0 tokens) that an empty last text may start at
        starts = np.flatnonzero(boundary)
        cuts = np.empty(len(starts) + 1, dtype=np.int32)
        cuts[:-1], cuts[-1] = starts, len(raw)
        pieces = pa.Array.from_buffers(pa.string(), len(cuts) - 1, [None, pa.py_buffer(cuts), pa.py_buffer(raw)])
        per_piece = self._counts_of(pieces)
        first = np.searchsorted(cuts, offsets[:-1])  # each text's first piece (an empty text: the next text's)
        sums = np.add.reduceat(per_piece, first, dtype=np.int64)
        return np.where(offsets[1:] > offsets[:-1], sums, 0)

    def _counts_of(self, pieces) -> np.ndarray:
        """int32 count of each piece (an Arrow string array). The pieces of recent calls are looked up in one
        pass (`index_in`, cheaper than a dictionary encode); the others are dictionary-encoded and counted by
        `_piece_counts`, and join the recent ones (which start over past _MAX_RECENT)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        recent, recent_counts = self._recent
        found = pc.take(recent_counts, pc.index_in(pieces, value_set=recent))
        if not found.null_count:
            return found.to_numpy()
        per_piece = found.fill_null(0).to_numpy(zero_copy_only=False, writable=True)
        missing = np.flatnonzero(found.is_null().to_numpy(zero_copy_only=False))
        encoded = pc.dictionary_encode(columnar.subset(pieces, missing))
        counts = pa.array(self._piece_counts(encoded.dictionary.to_pylist()), type=pa.int32())
        per_piece[missing] = pc.take(counts, encoded.indices).to_numpy()
        if len(recent) + len(counts) > _MAX_RECENT:
            self._recent = (encoded.dictionary, counts)
        else:
            self._recent = (pa.concat_arrays([recent, encoded.dictionary]), pa.concat_arrays([recent_counts, counts]))
        return per_piece

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


def _ends_run(config: dict) -> np.ndarray:
    """By byte value: ASCII whitespace, and the first byte of each added token. The tokenizer cuts the text
    at its added tokens before it pre-tokenizes, so a whitespace run before one ends there as at a text's
    end ("a  <|im_end|>": "a", "  ", "<|im_end|>")."""
    table = _ASCII_SPACE.copy()
    for token in config.get("added_tokens") or []:
        content = str(token.get("content", "")).encode()
        if content:
            table[content[0]] = True
    return table


def _spaces_inside_runs(raw: np.ndarray, offsets: np.ndarray, ends_run: np.ndarray) -> np.ndarray:
    """Where the spaces with whitespace on both sides are (byte positions): a text's end, or a byte `ends_run`
    marks (a possible added token), counts as whitespace after. Only spaces after whitespace, a control or
    a non-ASCII byte are looked at; a non-ASCII neighbour is whitespace when its bytes are one of the Unicode
    spaces. An added token's first byte that starts no token can only make a space look inside a run, so
    that it is not cut at: never wrong."""
    odd = raw.view(np.int8) < 0x21  # whitespace, controls and non-ASCII bytes
    pairs = np.flatnonzero(odd[:-1] & odd[1:])
    spaces = pairs[raw[pairs + 1] == 0x20] + 1
    if not len(spaces):
        return spaces
    text_start = np.zeros(len(raw) + 1, dtype=bool)
    text_start[offsets] = True
    before, after = raw[spaces - 1], raw[np.minimum(spaces + 1, len(raw) - 1)]
    ends = text_start[spaces + 1]
    ws_before = _ASCII_SPACE[before] & ~text_start[spaces]
    ws_after = ends_run[after] | ends
    wide = np.flatnonzero((before >= 0x80) & ~text_start[spaces])  # the character before ends at the space
    ws_before[wide[_unicode_spaces_at(raw, offsets, spaces[wide], before=True)]] = True
    wide = np.flatnonzero((after >= 0x80) & ~ends & ws_before)  # the character after starts after the space
    ws_after[wide[_unicode_spaces_at(raw, offsets, spaces[wide], before=False)]] = True
    return spaces[ws_before & ws_after]


def _unicode_spaces_at(raw: np.ndarray, offsets: np.ndarray, spaces: np.ndarray, before: bool) -> np.ndarray:
    """Whether the character just before (or after) each of these spaces, in its text, is a non-ASCII space."""
    text = np.searchsorted(offsets, spaces, side="right")  # the space's text is offsets[text - 1]:offsets[text]
    hit = np.zeros(len(spaces), dtype=bool)
    for seq in _NON_ASCII_SPACES:
        first = spaces - len(seq) if before else spaces + 1
        found = (first >= offsets[text - 1]) & (first + len(seq) <= offsets[text])
        for k, byte in enumerate(seq):
            found &= raw[np.clip(first + k, 0, len(raw) - 1)] == byte
        hit |= found
    return hit


def _canonical_digits(raw: np.ndarray, after_space: bool) -> np.ndarray:
    """The bytes with every ASCII digit between two ASCII characters made a "0" (after a space only if
    `after_space`: " 0" … " 9" count the same): the same counts with a tokenizer that never merges digits (see
    the module doc), and numbers become pieces seen before. `raw` itself when no digit changes."""
    digits = np.flatnonzero((raw - np.uint8(0x30)) < 10)
    before = raw[np.maximum(digits - 1, 0)]  # at a text's start or end the neighbour is another text's or
    after = raw[np.minimum(digits + 1, len(raw) - 1)]  # the digit itself: either way the rule holds
    same = digits[(before < 0x80) & (after < 0x80) & (after_space | (before != 0x20))]
    if not len(same):
        return raw
    canonical = raw.copy()
    canonical[same] = 0x30
    return canonical


_COUNTERS: dict[str, TokenCounter] = {}
_COUNTERS_LOCK = threading.Lock()


def token_counter(path: str | Path) -> TokenCounter:
    """The process's TokenCounter for a tokenizer path (loaded once, its piece cache kept)."""
    key = str(path)
    with _COUNTERS_LOCK:
        if key not in _COUNTERS:
            _COUNTERS[key] = TokenCounter(key)
        return _COUNTERS[key]


def load_token_counter(path: str):
    """A function texts (Arrow string array or list of str) -> token counts (int64 array), from a local
    tokenizer (tokenizer.json via `tokenizers`, else transformers' AutoTokenizer with local files only).
    Loaded once per path; see `tokens.TokenCounter`."""
    return token_counter(path).count

