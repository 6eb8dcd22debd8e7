"""A markdown evaluation report: a metrics table and a few example answers side by side."""

from __future__ import annotations

import math
from typing import Any

from alignment_pipelines.data.schemas import render_prompt


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}"
    return str(v)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _quote(text: str) -> str:
    text = (text or "").strip()
    if not text:
        return "> *(empty)*"
    return "\n".join("> " + line if line else ">" for line in text.splitlines())


def build_report(metrics: dict, examples: list[dict], title: str = "Evaluation report", max_examples: int = 5) -> str:
    """Markdown with a metrics table and up to ``max_examples`` examples.

    ``metrics``: name → value (nested dicts are flattened as ``outer/inner``).
    ``examples``: dicts with ``prompt`` (messages or str), ``policy`` and ``baseline``
    answers, and optionally ``verdict`` (e.g. ``"win"``) or ``score``.
    """
    flat: dict[str, Any] = {}

    def walk(prefix: str, d: dict) -> None:
        for k, v in d.items():
            key = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict):
                walk(key, v)
            else:
                flat[key] = v

    walk("", metrics or {})
    lines = [f"# {title}", "", "## Metrics", ""]
    if flat:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(_fmt(v))} |" for k, v in flat.items()]
    else:
        lines.append("*(no metrics)*")
    lines += ["", "## Examples", ""]
    shown = list(examples or [])[:max_examples]
    if not shown:
        lines.append("*(no examples)*")
    for i, ex in enumerate(shown, 1):
        header = f"### Example {i}"
        if ex.get("verdict") is not None:
            header += f" ({ex['verdict']})"
        lines += [header, "", "**Prompt**", "", _quote(render_prompt(ex.get("prompt", ""))), "",
                  "**Policy**", "", _quote(str(ex.get("policy", ""))), "",
                  "**Baseline**", "", _quote(str(ex.get("baseline", ""))), ""]
    return "\n".join(lines).rstrip() + "\n"
