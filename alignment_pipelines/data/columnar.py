"""Vectorised helpers over Arrow columns: the prompt's derived texts, Python-exact normalisation and the
content keys of many records at once.

Every function here gives exactly what its one-record counterpart in `schemas`/`splits` gives
(`render_prompt`, `last_user_turn`, `normalize_text`, `prompt_key`, `record_key`), for all records of a
chunk at once: Arrow kernels and numpy over the UTF-8 bytes for the common case, Python only for the rows
that need it (NFC of text with a character NFC may change), hashlib for the digests.
"""

from __future__ import annotations

import functools
import hashlib
import unicodedata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# every character Python's str.isspace() accepts (what the `\s` of the rules and str.strip mean)
PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                 "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")  # written out: computing it costs 0.1 s a process
WS_CLASS = "".join(("\\" + c) if c in "\\]^-[" else c for c in PY_WHITESPACE)
MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
PROMPT_TYPE = pa.list_(MESSAGE_TYPE)


def as_array(column: Any) -> pa.Array:
    """One contiguous Arrow array from a column (ChunkedArray or Array)."""
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def subset(data: Any, index: np.ndarray) -> Any:
    """data[index] for sorted row indices (an Arrow array or table); no copy when they are all the rows."""
    n = data.num_rows if isinstance(data, pa.Table) else len(data)
    return data if len(index) == n else data.take(pa.array(index))


def string_offsets(arr: pa.Array) -> np.ndarray:
    """Where each value of a string array starts in its data buffer, then where the last ends (no copy)."""
    return np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]


def strip(arr: pa.Array) -> pa.Array:
    """`str.strip()` of each value: every character `str.isspace()` accepts, at both ends."""
    return pc.utf8_trim(arr, PY_WHITESPACE)


def normalize(arr: pa.Array) -> pa.Array:
    """`schemas.normalize_text` of each value: NFC, then stripped. ASCII text is already NFC."""
    arr = as_array(arr)
    if len(arr) == 0:
        return arr
    unsure = _maybe_not_nfc(arr)
    if unsure.any():
        values = arr.filter(pa.array(unsure)).to_pylist()
        fixed = pa.array([unicodedata.normalize("NFC", v) for v in values], type=pa.string())
        arr = pc.replace_with_mask(arr, pa.array(unsure), fixed)
    return strip(arr)


def _maybe_not_nfc(arr: pa.Array) -> np.ndarray:
    """Which values NFC might change, found on the UTF-8 bytes: those with a character outside the BMP or one
    of `_nfc_unsure()`. The rest (ASCII, and most other text) is NFC already."""
    data, offsets = value_bytes(arr)
    lead = np.flatnonzero(data >= 0xC0)  # the first byte of each non-ASCII character
    if not len(lead):
        return np.zeros(len(arr), dtype=bool)
    last = len(data) - 1
    b0 = data[lead].astype(np.int32)
    b1 = data[np.minimum(lead + 1, last)].astype(np.int32) & 0x3F
    b2 = data[np.minimum(lead + 2, last)].astype(np.int32) & 0x3F
    code = np.where(b0 < 0xE0, ((b0 & 0x1F) << 6) | b1, ((b0 & 0x0F) << 12) | (b1 << 6) | b2)
    unsure = (b0 >= 0xF0) | _nfc_unsure()[code & 0xFFFF]
    return _rows_at(lead[unsure], offsets, len(arr))


@functools.cache
def _nfc_unsure() -> np.ndarray:
    """By BMP code point: the characters whose presence may make a text not NFC (NFC_Quick_Check not Yes, or
    a non-zero combining class, over-approximated): one NFC changes alone, one that composes with the
    character before it (the second of a canonical pair; Hangul vowels and final consonants), a combining
    mark, a surrogate. A text with none of them is NFC."""
    unsure = np.zeros(0x10000, dtype=bool)
    unsure[0xD800:0xE000] = True
    unsure[0x1161:0x1176] = unsure[0x11A8:0x11C3] = True
    for code in range(0x80, 0x10000):
        c = chr(code)
        if 0xD800 <= code < 0xE000:
            continue
        if unicodedata.combining(c) or unicodedata.normalize("NFC", c) != c:
            unsure[code] = True
        parts = unicodedata.decomposition(c).split()
        if len(parts) == 2 and not parts[0].startswith("<") and int(parts[1], 16) < 0x10000:
            unsure[int(parts[1], 16)] = True
    return unsure


def prompt_parts(prompt: pa.Array) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """(roles, contents, parent row of each message) of a list<struct<role, content>> column."""
    prompt = as_array(prompt)
    messages = prompt.flatten()
    parents = pc.list_parent_indices(prompt).to_numpy(zero_copy_only=False)
    return messages.field("role"), messages.field("content"), parents


def list_of(prompt: pa.Array, values: pa.Array) -> pa.ListArray:
    """A list array with the prompt's list structure over `values` (one value per message)."""
    prompt = as_array(prompt)
    offsets = np.asarray(prompt.offsets.to_numpy(zero_copy_only=False), dtype=np.int32)
    offsets = offsets - offsets[0]
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)


def render_prompts(prompt: pa.Array) -> pa.Array:
    """`schemas.render_prompt` of each row: "role: content" turns joined by a blank line."""
    roles, contents, _ = prompt_parts(prompt)
    turns = pc.binary_join_element_wise(roles, contents, ": ")
    return pc.fill_null(pc.binary_join(list_of(prompt, turns), "\n\n"), "")


def last_user_turns(prompt: pa.Array) -> pa.Array:
    """`schemas.last_user_turn` of each row: the content of its last user turn, "" when none."""
    prompt = as_array(prompt)
    roles, contents, parents = prompt_parts(prompt)
    n = len(prompt)
    last = np.full(n, -1, dtype=np.int64)
    users = np.flatnonzero(pc.equal(roles, "user").to_numpy(zero_copy_only=False))
    if len(users):
        np.maximum.at(last, parents[users], users)
    has = last >= 0
    result = pa.array([""] * n, type=pa.string())
    if has.any():
        return pc.replace_with_mask(result, pa.array(has), contents.take(pa.array(last[has])))
    return result


def json_escape(arr: pa.Array) -> pa.Array:
    """The body of `json.dumps(value, ensure_ascii=False)` for text without other control characters
    than tab, newline and carriage return (what a row that passed the rules holds)."""
    arr = as_array(arr)
    special = _rows_with_json_specials(arr)
    if not special.any():
        return arr
    index = np.flatnonzero(special)
    sub = arr.take(pa.array(index))
    for old, new in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        sub = pc.replace_substring(sub, old, new)
    return pc.replace_with_mask(arr, pa.array(special), sub)


def _rows_with_json_specials(arr: pa.Array) -> np.ndarray:
    """Which values hold a quote, a backslash or a control character (read from the bytes: RE2 is slower)."""
    data, offsets = value_bytes(arr)
    return _rows_at(np.flatnonzero((data < 0x20) | (data == 0x22) | (data == 0x5C)), offsets, len(arr))


def control_char_rows(arr: Any) -> np.ndarray:
    """Which values `validate.rules.CONTROL_CHARS` matches, found on the UTF-8 bytes (RE2 is slower): a C0 control
    other than tab, newline and carriage return, DEL, a C1 control (C2 80-9F) or U+FFFD (EF BF BD)."""
    arr = as_array(arr)
    data, offsets = value_bytes(arr)
    at = np.flatnonzero((data < 0x20) | (data == 0x7F) | (data == 0xC2) | (data == 0xEF))
    first = data[at]
    second = data[np.minimum(at + 1, len(data) - 1)]
    third = data[np.minimum(at + 2, len(data) - 1)]
    hit = (((first < 0x20) & (first != 0x09) & (first != 0x0A) & (first != 0x0D)) | (first == 0x7F)
           | ((first == 0xC2) & (second >= 0x80) & (second <= 0x9F))
           | ((first == 0xEF) & (second == 0xBF) & (third == 0xBD)))
    return _rows_at(at[hit], offsets, len(arr))


def value_bytes(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The bytes of a string array's values (no copy) and where each value starts in them, then the end."""
    if not len(arr) or arr.buffers()[2] is None:
        return np.zeros(0, dtype=np.uint8), np.zeros(len(arr) + 1, dtype=np.int32)
    offsets = string_offsets(arr)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0]: offsets[-1]]
    return data, offsets - offsets[0]


def _rows_at(positions: np.ndarray, offsets: np.ndarray, n: int) -> np.ndarray:
    """A mask of the values that hold these byte positions."""
    rows = np.zeros(n, dtype=bool)
    rows[np.searchsorted(offsets, positions, side="right") - 1] = True
    return rows


def _sha256_hex(payloads: pa.Array) -> list[str]:
    return [hashlib.sha256(p).hexdigest() for p in payloads.cast(pa.binary()).to_pylist()]


def prompt_keys(prompt: pa.Array) -> list[str]:
    """`splits.prompt_key` of each row (sha256 hex of the normalised turns as sorted-key JSON)."""
    roles, contents, _ = prompt_parts(prompt)
    if len(roles):
        distinct = pc.unique(roles).to_pylist()
        lowered = pa.array([str(r).strip().lower() for r in distinct], type=pa.string())
        roles = pc.take(lowered, pc.index_in(roles, value_set=pa.array(distinct, type=pa.string())))
    turns = pc.binary_join_element_wise(
        '{"content":"', json_escape(normalize(contents)), '","role":"', json_escape(roles), '"}', "")
    body = pc.fill_null(pc.binary_join(list_of(prompt, turns), ","), "")
    return _sha256_hex(pc.binary_join_element_wise("[", body, "]", ""))


def _sha256_key64(payloads: pa.Array) -> np.ndarray:
    """The first 64 bits of each payload's sha256, as uint64 (what `key64` gives of the hex key)."""
    digests = b"".join(hashlib.sha256(p).digest()[:8] for p in payloads.cast(pa.binary()).to_pylist())
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def pair_payloads(prompt_key_hex: list[str], chosen_norm: pa.Array, rejected_norm: pa.Array) -> pa.Array:
    """What `splits.record_key(…, "pairwise")` hashes, from the prompt keys and the normalised answers."""
    return pc.binary_join_element_wise(
        '["pairwise","', pa.array(prompt_key_hex, type=pa.string()), '","', json_escape(chosen_norm), '","',
        json_escape(rejected_norm), '"]', "")


def binary_payloads(prompt_key_hex: list[str], completion_norm: pa.Array, labels: np.ndarray) -> pa.Array:
    """What `splits.record_key(…, "binary")` hashes, for boolean labels."""
    token = pa.array(np.where(labels, "1", "0").tolist(), type=pa.string())
    return pc.binary_join_element_wise(
        '["binary","', pa.array(prompt_key_hex, type=pa.string()), '","', json_escape(completion_norm), '","',
        token, '"]', "")


def pair_keys(prompt_key_hex: list[str], chosen_norm: pa.Array, rejected_norm: pa.Array) -> list[str]:
    """`splits.record_key(…, "pairwise")` (hex) from the prompt keys and the normalised answers."""
    return _sha256_hex(pair_payloads(prompt_key_hex, chosen_norm, rejected_norm))


def binary_keys(prompt_key_hex: list[str], completion_norm: pa.Array, labels: np.ndarray) -> list[str]:
    """`splits.record_key(…, "binary")` (hex) for boolean labels."""
    return _sha256_hex(binary_payloads(prompt_key_hex, completion_norm, labels))


def record_key64(kind: str, prompt_key_hex: list[str], texts: dict[str, pa.Array], labels: np.ndarray | None = None
                 ) -> np.ndarray:
    """`key64` of `splits.record_key` for records whose normalised texts are given."""
    if kind == "pairwise":
        return _sha256_key64(pair_payloads(prompt_key_hex, texts["chosen"], texts["rejected"]))
    if kind == "binary":
        return _sha256_key64(binary_payloads(prompt_key_hex, texts["completion"], labels))
    return key64(prompt_key_hex)


def key64(hex_keys: list[str]) -> np.ndarray:
    """The first 64 bits of each sha256 hex key, as uint64 (what duplicate detection compares)."""
    if not hex_keys:
        return np.zeros(0, dtype=np.uint64)
    return np.frombuffer(bytes.fromhex("".join(k[:16] for k in hex_keys)), dtype=">u8").astype(np.uint64)


COMPLETION_FIELDS = {"pairwise": ("chosen", "rejected"), "binary": ("completion",), "prompts": ()}


def derived_columns(table: pa.Table, kind: str) -> dict[str, pa.Array]:
    """The suite's text columns (prompt_text, prompt_final and the answers) of a records table."""
    prompt = as_array(table.column("prompt"))
    out = {"prompt_text": render_prompts(prompt), "prompt_final": last_user_turns(prompt)}
    for col in COMPLETION_FIELDS[kind]:
        out[col] = pc.fill_null(as_array(table.column(col)), "")
    return out
