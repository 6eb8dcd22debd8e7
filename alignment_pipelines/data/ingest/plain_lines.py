"""Plain JSON Lines rows, read without a JSON parser: the two shapes most feedback comes in, recognised by
one RE2 pattern each over the raw line, their strings found from the quotes' positions and decoded on the
bytes, for a whole chunk at once.

- `PAIRWISE`: `{"prompt": "…", "chosen": "…", "rejected": "…"}`
- `CONVERSATIONAL`: `{"prompt": [{"role", "content"}…], "chosen": [{"role": "assistant", …}], "rejected": […]}`

A line matches only if it is exactly that: no duplicate or extra keys, string values only, roles valid,
the prompt ending with a user turn, one assistant answer, no lone surrogate escape. `plain_columns` gives
the records the importer would give for such lines.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignment_pipelines.data import columnar

_WS = r"[ \t\r]*"
_STR = (r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-CefEF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2}))*"')


def _msg(role: str) -> str:
    return (rf'\{{{_WS}"role"{_WS}:{_WS}{role}{_WS},{_WS}"content"{_WS}:{_WS}{_STR}{_WS}\}}')


_ANY_ROLE = '"(?:system|user|assistant)"'
CONVERSATIONAL = (
    rf'^{_WS}\{{{_WS}"prompt"{_WS}:{_WS}\[{_WS}(?:{_msg(_ANY_ROLE)}{_WS},{_WS})*{_msg(chr(34) + "user" + chr(34))}{_WS}\]'
    rf'{_WS},{_WS}"chosen"{_WS}:{_WS}\[{_WS}{_msg(chr(34) + "assistant" + chr(34))}{_WS}\]'
    rf'{_WS},{_WS}"rejected"{_WS}:{_WS}\[{_WS}{_msg(chr(34) + "assistant" + chr(34))}{_WS}\]{_WS}\}}[ \t\r\n]*$'
)
PAIRWISE = (
    rf'^{_WS}\{{{_WS}"prompt"{_WS}:{_WS}{_STR}{_WS},{_WS}"chosen"{_WS}:{_WS}{_STR}{_WS},'
    rf'{_WS}"rejected"{_WS}:{_WS}{_STR}{_WS}\}}[ \t\r\n]*$'
)


@dataclass
class _Strings:
    """The JSON strings of some plain lines, keys and values in line order: the byte offsets of each body
    in the text buffer (start, end), whether it holds an escape, and the position of each line's first."""

    text: pa.Array
    start: np.ndarray
    end: np.ndarray
    escaped: np.ndarray
    first: np.ndarray


def _string_spans(text: pa.Array, index: np.ndarray) -> _Strings:
    """The JSON strings of the plain lines at `index` (see `_Strings`).

    A plain line's grammar (checked by the shape's pattern) has no quote outside a string and no backslash
    outside one, so its quotes are the strings' delimiters, except a quote escaped by an odd run of
    backslashes."""
    offsets = columnar.string_offsets(text)
    data = np.frombuffer(text.buffers()[2], dtype=np.uint8)
    lo, hi = int(offsets[0]), int(offsets[-1])
    region = data[lo:hi]
    quotes = np.flatnonzero(region == 0x22) + lo
    backslash = np.flatnonzero(region == 0x5C) + lo
    if len(backslash) and len(quotes):
        after = quotes[data[quotes - 1] == 0x5C]  # quotes right after a backslash: escaped if its run is odd
        first_of_run = _first_of_runs(backslash)
        last = np.searchsorted(backslash, after - 1)
        escaped = after[(after - first_of_run[last]) % 2 == 1]
        quotes = np.delete(quotes, np.searchsorted(quotes, escaped))
    line_first = np.searchsorted(quotes, offsets[index])
    line_end = np.searchsorted(quotes, offsets[index + 1])
    if len(index) < len(text):  # the plain lines' quotes only: those before, between and after them go
        quotes = np.delete(quotes, _ranges(np.concatenate([[0], line_end]), np.concatenate([line_first, [len(quotes)]])))
    start, end = quotes[0::2] + 1, quotes[1::2]
    escaped = np.searchsorted(backslash, start) < np.searchsorted(backslash, end)
    strings = (line_end - line_first) // 2
    return _Strings(text, start, end, escaped, np.concatenate([[0], np.cumsum(strings)])[:-1])


def _ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """The integers of the ranges [starts[i], stops[i]), one range after the other (np.arange of each, joined)."""
    lengths = stops - starts
    return np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)


def _first_of_runs(positions: np.ndarray) -> np.ndarray:
    """For sorted byte positions, the first position of the run of consecutive ones each belongs to."""
    run_start = np.ones(len(positions), dtype=bool)
    run_start[1:] = positions[1:] != positions[:-1] + 1
    return positions[np.maximum.accumulate(np.where(run_start, np.arange(len(positions)), 0))]


def _strings_at(strings: _Strings, which: np.ndarray) -> pa.Array:
    """The values of the strings `which` (indices): their bodies copied out of the buffer in one take,
    JSON escapes decoded where a body has one."""
    bounds = np.empty(2 * len(strings.start), dtype=np.int32)
    bounds[0::2], bounds[1::2] = strings.start, strings.end
    pieces = pa.Array.from_buffers(pa.string(), len(bounds) - 1, [None, pa.py_buffer(bounds), strings.text.buffers()[2]])
    values = pieces.take(pa.array(2 * which))  # piece 2i is string i, piece 2i + 1 the gap after it
    escaped = strings.escaped[which]
    if escaped.any():
        mask = pa.array(escaped)
        values = pc.replace_with_mask(values, mask, unescaped(values.filter(mask)))
    return values


_SIMPLE_ESCAPES = np.zeros(256, dtype=np.uint8)  # by the byte after a backslash: what the pair stands for (0: none)
_SIMPLE_ESCAPES[list(b'"\\/bfnrt')] = list(b'"\\/\b\f\n\r\t')
_HEX = np.full(256, 255, dtype=np.uint8)  # by byte: its value as a hex digit (255: not one)
_HEX[list(b"0123456789abcdef")] = np.arange(16)
_HEX[list(b"ABCDEF")] = np.arange(10, 16)


def unescaped(bodies: pa.Array) -> pa.Array:
    """JSON string bodies decoded, on the bytes: the two-byte escapes and `\\uXXXX` outside the surrogates
    (what the shape's pattern lets a plain line hold); a body with any other escape goes through json.loads."""
    data, offsets = columnar.value_bytes(bodies)
    slashes = np.flatnonzero(data == 0x5C)
    starts = slashes[(slashes - _first_of_runs(slashes)) % 2 == 0]  # a backslash that starts an escape: even in its run
    kind = data[np.minimum(starts + 1, len(data) - 1)]
    unicode = starts[kind == 0x75]
    digits = _HEX[data[np.minimum(unicode[:, None] + np.arange(2, 6), len(data) - 1)]].astype(np.int32)
    code = (digits[:, 0] << 12) | (digits[:, 1] << 8) | (digits[:, 2] << 4) | digits[:, 3]
    odd = (digits == 255).any(axis=1) | ((code >= 0xD800) & (code < 0xE000))
    simple = starts[kind != 0x75]
    meaning = _SIMPLE_ESCAPES[kind[kind != 0x75]]
    odd_simple = meaning == 0
    out = data.copy()
    keep = np.ones(len(data), dtype=bool)
    out[simple] = meaning
    keep[simple + 1] = False
    size = 1 + (code >= 0x80) + (code >= 0x800)
    for n, lead, shift in ((1, 0x00, 0), (2, 0xC0, 6), (3, 0xE0, 12)):  # code as UTF-8 over the escape's first bytes
        at, c = unicode[size == n], code[size == n]
        out[at] = lead | (c >> shift)
        for k in range(1, n):
            out[at + k] = 0x80 | ((c >> (shift - 6 * k)) & 0x3F)
        for k in range(n, 6):
            keep[at + k] = False
    dropped = np.searchsorted(np.flatnonzero(~keep), offsets)  # bytes dropped before each body's end
    decoded = pa.Array.from_buffers(pa.string(), len(bodies), [None, pa.py_buffer((offsets - dropped).astype(np.int32)),
                                                               pa.py_buffer(out[keep])])
    bad = np.zeros(len(bodies), dtype=bool)
    bad[np.searchsorted(offsets, np.concatenate([unicode[odd], simple[odd_simple]]), side="right") - 1] = True
    if bad.any():
        texts = bodies.filter(pa.array(bad)).to_pylist()
        fixed = json.loads("[" + ",".join('"' + b + '"' for b in texts) + "]")
        decoded = pc.replace_with_mask(decoded, pa.array(bad), pa.array(fixed, type=pa.string()))
    return decoded


def plain_columns(text: pa.Array, index: np.ndarray, conversational: bool) -> dict[str, pa.Array]:
    """prompt (messages), chosen and rejected of the plain lines at `index` (all of one shape), read from
    the strings' positions: a conversational line is "prompt", m x ("role", role, "content", content), then
    "chosen" and "rejected" with five strings each; a flat one is "prompt", p, "chosen", c, "rejected", r."""
    strings = _string_spans(text, index)
    first = strings.first
    if not conversational:
        n = len(index)
        prompt = pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32)),
            pa.StructArray.from_arrays([pa.array(["user"] * n, type=pa.string()), _strings_at(strings, first + 1)],
                                       fields=list(columnar.MESSAGE_TYPE)))
        return {"prompt": prompt, "chosen": _strings_at(strings, first + 3), "rejected": _strings_at(strings, first + 5)}
    messages = (np.diff(np.concatenate([first, [len(strings.start)]])) - 11) // 4
    line_of = np.repeat(np.arange(len(index)), messages)
    turn = np.arange(len(line_of)) - np.repeat(np.cumsum(messages) - messages, messages)
    role_at = first[line_of] + 2 + 4 * turn
    structs = pa.StructArray.from_arrays([_strings_at(strings, role_at), _strings_at(strings, role_at + 2)],
                                         fields=list(columnar.MESSAGE_TYPE))
    prompt_offsets = np.concatenate([[0], np.cumsum(messages)]).astype(np.int32)
    after = first + 1 + 4 * messages
    return {"prompt": pa.ListArray.from_arrays(pa.array(prompt_offsets), structs),
            "chosen": _strings_at(strings, after + 4), "rejected": _strings_at(strings, after + 9)}

