"""Every plot is a small, decodable PNG, for one method, for all of them, and for no data."""

import base64
import io
import math

import matplotlib.image
import pytest
from PIL import Image

from alignment_pipelines.evaluation.plots import (
    length_distributions,
    markdown_image,
    reward_vs_kl,
    training_curves,
    win_rate_bars,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METHODS = ["sft", "dpo", "kto", "orpo", "ppo", "rloo", "online_dpo"]


def assert_small_png(png: bytes):
    assert png.startswith(PNG_SIGNATURE)
    Image.open(io.BytesIO(png)).verify()
    width, height = Image.open(io.BytesIO(png)).size
    assert width == 480 and 240 <= height <= 600  # 6 inches wide at 80 dpi, 3 high or more for long lists
    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0  # something was drawn
    assert len(png) < 60_000  # carried inline as base64 in the metadata


def rows(names):
    return [{"name": name, "win_rate": 0.5 + 0.05 * i, "ci_low": 0.35 + 0.05 * i, "ci_high": 0.65 + 0.04 * i}
            for i, name in enumerate(names)]


def histories(names):
    return {name: [{"step": step, "loss": 1.0 / (step + i + 1), "rewards/margins": 0.1 * step}
                   for step in range(10)] for i, name in enumerate(names)}


@pytest.mark.parametrize("names", [METHODS[1:2], METHODS[:5]], ids=["one method", "five methods"])
def test_each_plot_is_a_valid_png_for_one_method_and_for_several(names):
    assert_small_png(win_rate_bars(rows(names), title="vs. SFT"))
    assert_small_png(reward_vs_kl([{"name": n, "reward": 0.1 * i, "kl": 0.2 * i} for i, n in enumerate(names)]))
    assert_small_png(length_distributions({n: [5 + i, 12, 30 + 3 * i, 31] for i, n in enumerate(names)}))
    assert_small_png(training_curves(histories(names), keys=["loss"]))


def test_all_methods_grow_the_bars_and_panels_without_breaking():
    bars = win_rate_bars(rows(METHODS))
    assert_small_png(bars)
    assert Image.open(io.BytesIO(bars)).size[1] > Image.open(io.BytesIO(win_rate_bars(rows(["dpo"])))).size[1]
    curves = training_curves(histories(METHODS), keys=["loss", "rewards/margins"])
    assert_small_png(curves)
    assert Image.open(io.BytesIO(curves)).size == (480, 320)  # two panels, 2 inches each


def test_missing_values_and_empty_inputs_still_render():
    with_gaps = [{"name": "ppo", "win_rate": math.nan, "ci_low": 0.0, "ci_high": 1.0},
                 {"name": "dpo", "win_rate": 0.6, "ci_low": None, "ci_high": None}]
    assert_small_png(win_rate_bars(with_gaps))
    assert_small_png(win_rate_bars([]))
    assert_small_png(reward_vs_kl([{"name": "sft", "reward": 1.0, "kl": math.nan}]))
    assert_small_png(length_distributions({"sft": [], "dpo": [7, 7, 7]}))
    assert_small_png(length_distributions({}))
    assert_small_png(training_curves({"kto": [{"step": 1, "loss": 0.5}]}, keys=["rewards/margins"]))
    assert_small_png(training_curves({}, keys=[]))


def test_a_path_receives_the_same_bytes(tmp_path):
    target = tmp_path / "plots" / "win_rate.png"
    png = win_rate_bars(rows(["dpo", "kto"]), path=target)
    assert target.read_bytes() == png


def test_markdown_image_inlines_the_png():
    png = reward_vs_kl([{"name": "dpo", "reward": 0.3, "kl": 1.2}])
    markdown = markdown_image(png, "reward [vs] KL")
    assert markdown.startswith(r"![reward \[vs\] KL](data:image/png;base64,") and markdown.endswith(")")
    assert base64.b64decode(markdown.split("base64,", 1)[1][:-1]) == png
