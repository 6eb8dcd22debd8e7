"""The evaluation's pictures, as PNG bytes: for Dagster's markdown metadata and MLflow artifacts.

Figures are drawn on matplotlib's Agg canvas directly, without pyplot, so nothing here
touches matplotlib's global backend or figure registry: safe inside a Dagster process
and on a machine without a display. Images are kept small (6 x 3 inches at 80 dpi),
because the markdown metadata carries them inline as base64.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Iterable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 80
WIDTH = 6.0
HEIGHT = 3.0
EVEN = 0.5


def win_rate_bars(rows: Sequence[dict], title: str = "Win-rate (95% interval)",
                  path: str | Path | None = None) -> bytes:
    """One horizontal bar per model (``name``, ``win_rate``, ``ci_low``, ``ci_high``), its
    interval as an error bar and a line at 0.5: a bar whose interval crosses it is a tie."""
    fig, ax = _figure(height=max(HEIGHT, 0.45 * len(rows) + 1.2))
    if not rows:
        return _no_data(fig, ax, title, path)
    names = [str(row["name"]) for row in rows]
    rates = [_finite(row.get("win_rate")) for row in rows]
    below = [_gap(rate, row.get("ci_low")) for rate, row in zip(rates, rows)]
    above = [_gap(row.get("ci_high"), rate) for rate, row in zip(rates, rows)]
    positions = range(len(rows))
    ax.barh(positions, [rate or 0.0 for rate in rates], xerr=[below, above], capsize=4, color="tab:blue",
            alpha=0.8)
    ax.axvline(EVEN, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(list(positions), [f"{name} ({'n/a' if rate is None else f'{rate:.2f}'})"
                                    for name, rate in zip(names, rates)])
    ax.invert_yaxis()  # first row on top, as in the table beside it
    ax.set_xlim(0, 1)
    ax.set_xlabel("win-rate (ties count half)")
    ax.set_title(title)
    return _render(fig, path)


def reward_vs_kl(points: Sequence[dict], title: str = "Reward vs. KL to the reference",
                 path: str | Path | None = None, ylabel: str = "mean reward") -> bytes:
    """Mean reward against KL per model (``name``, ``reward``, ``kl``): the trade-off every
    KL-regularised method makes; up and to the left is better."""
    fig, ax = _figure()
    drawn = [p for p in points if _finite(p.get("reward")) is not None and _finite(p.get("kl")) is not None]
    if not drawn:
        return _no_data(fig, ax, title, path)
    for point in drawn:
        ax.scatter(point["kl"], point["reward"])
        ax.annotate(str(point["name"]), (point["kl"], point["reward"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.margins(0.15)  # room for the labels beside the outermost points
    ax.set_xlabel("KL to the reference")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _render(fig, path)


def length_distributions(lengths: dict[str, Sequence[int]], title: str = "Answer lengths",
                         xlabel: str = "answer length (tokens)", path: str | Path | None = None) -> bytes:
    """Overlaid histograms on shared bins, one outline per model: length drift (answers growing
    to please a judge, or collapsing to nothing) shows at a glance."""
    fig, ax = _figure()
    present = {name: list(values) for name, values in lengths.items() if len(values)}
    if not present:
        return _no_data(fig, ax, title, path)
    everything = [value for values in present.values() for value in values]
    low, high = min(everything), max(everything)
    bins = _bins(low, high)
    for name, values in present.items():
        ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("answers")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _render(fig, path)


def training_curves(histories: dict[str, Sequence[dict]], keys: Iterable[str] = ("loss",),
                    title: str = "Training curves", path: str | Path | None = None) -> bytes:
    """One panel per logged key (``loss``, ``rewards/margins``...), one line per model, against
    ``step``. Steps that did not log a key are skipped, as KTO or PPO log different things."""
    keys = list(keys)
    if not keys:
        fig, ax = _figure()
        return _no_data(fig, ax, title, path)
    fig = Figure(figsize=(WIDTH, max(HEIGHT, 2.0 * len(keys))), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    anything = False
    for ax, key in zip(axes, keys):
        for name, history in histories.items():
            logged = [(entry["step"], entry[key]) for entry in history
                      if "step" in entry and _finite(entry.get(key)) is not None]
            if logged:
                steps, values = zip(*logged)
                ax.plot(steps, values, label=name)
                anything = True
        ax.set_ylabel(key, fontsize=8)
    if not anything:
        return _no_data(fig, axes[0], title, path)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("step")
    fig.suptitle(title)
    return _render(fig, path)


def markdown_image(png_bytes: bytes, alt: str) -> str:
    """A markdown image with the PNG inline as a data URI: Dagster renders it in markdown
    metadata, and the report stays one self-contained text."""
    safe_alt = alt.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    return f"![{safe_alt}](data:image/png;base64,{base64.b64encode(png_bytes).decode('ascii')})"


def _figure(height: float = HEIGHT):
    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _no_data(fig: Figure, ax, title: str, path: str | Path | None) -> bytes:
    """An empty evaluation still gets a picture that says so, rather than no picture."""
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    fig.suptitle(title)
    return _render(fig, path)


def _render(fig: Figure, path: str | Path | None) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    png = buffer.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(png)
    return png


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _gap(upper, lower) -> float:
    """Length of an error-bar arm; zero where either end is unknown."""
    upper, lower = _finite(upper), _finite(lower)
    return max(0.0, upper - lower) if upper is not None and lower is not None else 0.0


def _bins(low: float, high: float, most: int = 30) -> list[float]:
    """Shared bin edges, about one unit wide for short answers and at most ``most`` bins; a
    single length still gets a visible bar."""
    if low == high:
        return [low - 0.5, high + 0.5]
    count = min(most, math.ceil(high - low))
    return [low + (high - low) * i / count for i in range(count)] + [high]


def score_histogram(chosen_scores: Sequence[float], rejected_scores: Sequence[float],
                    title: str = "Reward-model scores", path: str | Path | None = None) -> bytes:
    """Chosen and rejected answers' scores as overlaid histograms on shared bins, each mean as a
    dashed line: a reward model that separates the two shows two humps, one that does not, one."""
    fig, ax = _figure()
    groups = {"chosen": [s for s in map(_finite, chosen_scores) if s is not None],
              "rejected": [s for s in map(_finite, rejected_scores) if s is not None]}
    everything = groups["chosen"] + groups["rejected"]
    if not everything:
        return _no_data(fig, ax, title, path)
    low, high = min(everything), max(everything)
    count = 30
    bins = [low - 0.5, high + 0.5] if low == high else [low + (high - low) * i / count for i in range(count + 1)]
    for (name, scores), color in zip(groups.items(), ("tab:green", "tab:red")):
        if scores:
            ax.hist(scores, bins=bins, histtype="step", linewidth=1.5, color=color,
                    label=f"{name} (mean {sum(scores) / len(scores):.2f})")
            ax.axvline(sum(scores) / len(scores), color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("score")
    ax.set_ylabel("answers")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _render(fig, path)
