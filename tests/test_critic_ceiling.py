"""benchmarks/critic_ceiling.py's closed form for a perfect critic's explained variance, against a simulation.

The benchmark reads the critic's explained variance against this ceiling, so the formula must match what a
perfect critic would score on GAE returns computed the way the PPO trainer computes them."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment_pipelines.methods.rl_math import explained_variance, gae_advantages

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "critic_ceiling.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("critic_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_the_ceiling_matches_a_perfect_critic_on_the_trainers_returns(lam):
    """Answers whose score is the sum of independent token effects: the perfect value before token t is the sum
    of the effects so far, and the score's variance left at t, c_t, is known exactly (linear in t)."""
    ceiling = load_benchmark().ceiling
    rng = np.random.default_rng(0)
    length, scale = 12, 0.8
    remaining = scale ** 2 * np.arange(length, -1, -1)  # c_0 .. c_T
    # rows as the benchmark records them: fresh answers at t=0, and at every third position and the last two
    # scores whose sample variance is exactly c_t (the benchmark interpolates in between: exact for a linear c)
    positions = [*range(0, length, 3), length - 1]
    fresh = rng.normal(0, np.sqrt(remaining[0]), size=4000)
    rows = [{"length": length, "positions": positions,
             "scores": [fresh[i * 400:(i + 1) * 400].tolist()] + [
                 [-np.sqrt(remaining[t] / 2), np.sqrt(remaining[t] / 2)] for t in positions[1:]]}
            for i in range(10)]

    effects = torch.tensor(rng.normal(0, scale, size=(20000, length)), dtype=torch.float64)
    values = torch.cat([torch.zeros(len(effects), 1, dtype=torch.float64), effects.cumsum(1)[:, :-1]], dim=1)
    rewards = torch.zeros_like(effects)
    rewards[:, -1] = effects.sum(1)  # the score at the last token, as the trainer places it
    mask = torch.ones_like(effects)
    _, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=lam)
    simulated = explained_variance(values, returns, mask)

    assert ceiling(rows, lam) == pytest.approx(simulated, abs=0.03)
    assert 0.1 < simulated < 0.9  # neither trivial end
