"""Who judges an evaluation's win-rates: a reward model when there is one, else the deployment's judge.

One choice for the ``evaluation_report`` asset (the ``evaluation_reward_model`` it trains on the judge split) and
``alignment-pipelines evaluate`` (a reward model given by ``--judge-model``).
"""

from __future__ import annotations

from collections.abc import Callable

from alignment_pipelines.evaluation.schema import JudgeIdentity
from alignment_pipelines.judges.reward_model import RewardModelJudge
from alignment_pipelines.refs import ModelRef

EVALUATION_REWARD_MODEL = "evaluation_reward_model"


def evaluation_judge(choice: str, judge_model: ModelRef | None, deployment_judge: Callable[[], object],
                     batch_size: int) -> tuple[object, JudgeIdentity, list[str]]:
    """The judge, its identity and a note on the choice. ``choice`` is where ``judge_model`` (a reward model) comes
    from, ``evaluation_reward_model`` or ``explicit`` (given by hand): it judges when it exists, its ``eval_``
    metrics as its accuracy. Otherwise, or with ``choice`` ``resource``, ``deployment_judge()`` builds the judge
    (the judge resource, or the environment's judge at the command line), with a note when the evaluation reward
    model was asked for but is not trained yet."""
    if choice != "resource" and judge_model is not None:
        judge = RewardModelJudge(judge_model.path, judge_model.uri, batch_size)
        accuracy = {k: v for k, v in judge_model.metrics.items()
                    if k.startswith("eval_") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return judge, JudgeIdentity.of(judge, choice, accuracy), []
    judge = deployment_judge()
    notes = [] if choice != EVALUATION_REWARD_MODEL else [
        f"No {EVALUATION_REWARD_MODEL} has been trained yet (it trains on the judge split of preference_pairs): "
        "the judge resource judged."]
    return judge, JudgeIdentity.of(judge, "resource"), notes
