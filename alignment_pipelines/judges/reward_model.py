"""A reward model as a judge: each answer gets the model's score, the higher one wins.

The evaluation judges with a reward model trained on the judge split (``evaluation_reward_model``), which no
policy and no training reward model sees, so a policy that optimised a reward model is never judged by it. A
reward model scores each answer on its own, so its two orders always agree; it keeps the batch interface all the
same: :meth:`~alignment_pipelines.judges.base.ScoreBasedJudge.compare_batch` scores every distinct answer of both
orders in one batch.
"""

from __future__ import annotations

from pathlib import Path

from alignment_pipelines.judges.base import ScoreBasedJudge


class RewardModelJudge(ScoreBasedJudge):
    """Judges by a reward model's scores (a one-label sequence classifier, role ``reward``: a safetensors folder or
    a LoRA adapter on one). ``model_uri`` names the registered version it is (``models:/evaluation_reward_model/3``)
    and is its identity when given. The model loads on first use; :meth:`release` frees it."""

    name = "reward_model"

    def __init__(self, model_dir: str | Path, model_uri: str | None = None, batch_size: int = 8,
                 max_length: int | None = 1024, device: str | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r}: must be positive")
        self.model_dir = str(model_dir)
        self.model_uri = model_uri
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self._score = None

    def id_params(self):
        return {"model": self.model_uri or self.model_dir}

    def score_batch(self, prompts, answers):
        if self._score is None:
            from alignment_pipelines.methods.rewards import reward_model_reward
            from alignment_pipelines.models.loading import load_model

            model, tokenizer = load_model(self.model_dir, "reward", device=self.device, padding_side="right")
            self._score = reward_model_reward(model, tokenizer, self.batch_size, max_length=self.max_length)
        return self._score(list(prompts), list(answers))

    def score(self, prompt, answer):
        return self.score_batch([prompt], [answer])[0]

    def release(self) -> None:
        """Free the model (an evaluation loads many models one after another)."""
        self._score = None
