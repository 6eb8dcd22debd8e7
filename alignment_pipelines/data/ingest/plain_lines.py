"""Plain JSON Lines rows: the two shapes most feedback comes in, decoded by msgspec straight into typed structs
(no dict per row), their records built as Arrow columns for a whole chunk at once.

- `Flat`: `{"prompt": "…", "chosen": "…", "rejected": "…"}`
- `Conversational`: `{"prompt": [{"role", "content"}…], "chosen": [{"role": "assistant", …}], "rejected": […]}`

A line is plain only if it is exactly that: no extra keys (`forbid_unknown_fields`), string values, roles
valid, the prompt ending with a user turn, one assistant answer each. A duplicate key keeps its last value, as
Python's `json` does; a lone surrogate escape is a decode error. What is not plain (or not JSON msgspec
reads) is left to the row converters, which parse it with Python's `json` and name its error. Why msgspec and
not the hand-written reader this replaced: benchmarks/results/parsers.md.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import numpy as np
import pyarrow as pa

from alignment_pipelines.data import columnar


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str


class Conversational(msgspec.Struct, forbid_unknown_fields=True):
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


class Flat(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str
    chosen: str
    rejected: str


_CONVERSATIONAL = msgspec.json.Decoder(Conversational)
_FLAT = msgspec.json.Decoder(Flat)


def _answer(messages: list[Message]) -> str | None:
    return messages[0].content if len(messages) == 1 and messages[0].role == "assistant" else None


class PlainLines:
    """The plain lines among some lines (by their index), and their records' columns, in index order."""

    def __init__(self) -> None:
        self.conversational: list[int] = []
        self.flat: list[int] = []
        self.index: list[int] = []
        self._roles: list[str] = []
        self._contents: list[str] = []
        self._offsets: list[int] = [0]
        self._chosen: list[str] = []
        self._rejected: list[str] = []

    def read(self, index: list[int], texts: list[bytes]) -> None:
        """Decode each text (a line); keep the plain ones."""
        for i, text in zip(index, texts):
            try:
                row = _CONVERSATIONAL.decode(text)
            except msgspec.ValidationError:
                try:
                    flat = _FLAT.decode(text)
                except msgspec.MsgspecError:
                    continue
                self.add(i, [("user", flat.prompt)], flat.chosen, flat.rejected, flat=True)
                continue
            except msgspec.DecodeError:
                continue
            chosen, rejected = _answer(row.chosen), _answer(row.rejected)
            if row.prompt and row.prompt[-1].role == "user" and chosen is not None and rejected is not None:
                self.add(i, [(m.role, m.content) for m in row.prompt], chosen, rejected, flat=False)

    def add(self, i: int, turns: list[tuple[str, str]], chosen: str, rejected: str, flat: bool) -> None:
        """Line `i` is plain: its prompt's (role, content) turns and its answers."""
        (self.flat if flat else self.conversational).append(i)
        self.index.append(i)
        for role, content in turns:
            self._roles.append(role)
            self._contents.append(content)
        self._offsets.append(len(self._roles))
        self._chosen.append(chosen)
        self._rejected.append(rejected)

    def columns(self) -> dict[str, pa.Array]:
        """prompt (messages), chosen and rejected of the plain lines, in the order they were read."""
        messages = pa.StructArray.from_arrays(
            [pa.array(self._roles, pa.string()), pa.array(self._contents, pa.string())],
            fields=list(columnar.MESSAGE_TYPE))
        return {"prompt": pa.ListArray.from_arrays(pa.array(np.asarray(self._offsets, dtype=np.int32)), messages),
                "chosen": pa.array(self._chosen, pa.string()), "rejected": pa.array(self._rejected, pa.string())}
