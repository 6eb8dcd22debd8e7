"""Tests that know which way is up (issue 24): each fails when a learning signal's sign flips.

DPO and KTO are covered in test_methods.py / test_methods_kto_orpo_resume.py, which measure the implicit
reward margin on the saved model against the start model. ORPO is covered here, measured the same way.
The rest of the file pins the RL maths and the trainers' sign, temperature, mask and EOS lines that the
mutation run (mutation/, benchmarks/results/mutation.md) found unguarded.
"""

from __future__ import annotations

import statistics

import pandas as pd
import pytest

TOPICS = "tea coffee water bread rice apple garden city river book".split()


@pytest.fixture
def one_thread():
    """The tiny model trains much faster on one thread than on 2 oversubscribed cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def yes_no_pairs() -> pd.DataFrame:
    """Chosen and rejected answers of equal shape that differ in their verdict: "Yes, tea is good." over
    "No, tea is bad.", so that no length or shared-token effect can pass for a learned preference."""
    return pd.DataFrame([
        {"prompt": [{"role": "user", "content": f"Is {topic} good?"}],
         "chosen": f"Yes, {topic} is good.", "rejected": f"No, {topic} is bad."}
        for topic in TOPICS
    ])


def logprob_margin(model_dir, pairs: pd.DataFrame) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected), from the model saved in ``model_dir``."""
    from alignment_pipelines.evaluation.metrics import pair_logprobs
    from alignment_pipelines.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir, device="cpu")
    chosen, rejected = pair_logprobs(model, tokenizer, pairs)
    return statistics.fmean(chosen) - statistics.fmean(rejected)


def test_orpo_raises_the_chosen_over_rejected_margin_of_its_training_pairs(tmp_path, tiny_model_dir, one_thread):
    """ORPO has no reference model, so the margin is the log-probability of chosen minus rejected.

    λ (``beta``) is 2, not the default 0.1: at 0.1 the NLL on the chosen answers alone raises the margin, and
    a flipped odds-ratio term goes unnoticed (checked by hand: +4.6, and +3.2 with the term's sign flipped);
    at 2 the odds-ratio term leads, and flipping its sign drives the margin down (-12 instead of +10).
    """
    from alignment_pipelines.methods import run_training
    from alignment_pipelines.methods.orpo import ORPOMethodConfig

    pairs = yes_no_pairs()
    data = tmp_path / "pairs.parquet"
    pairs.to_parquet(data)
    out = tmp_path / "orpo"
    run_training("orpo", ORPOMethodConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out),
                                          max_steps=10, learning_rate=5e-3, beta=2.0))
    before, after = logprob_margin(tiny_model_dir, pairs), logprob_margin(out, pairs)
    print(f"ORPO log p(chosen) - log p(rejected): before {before:.3f}, after {after:.3f}")
    assert after > before + 3.0
