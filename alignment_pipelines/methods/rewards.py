"""Reward sources for the online methods (PPO, RLOO, ...), in TRL's reward-function convention.

A reward function is called as ``reward_fn(prompts=..., completions=..., **kwargs) -> list[float]`` with
one reward per completion, and has a ``__name__`` (used in metric names such as ``rewards/<name>/mean``).
The same functions work in the project's PPO trainer (completions are strings) and in TRL's RLOO/GRPO
trainers (completions of conversational prompts are ``[{"role": "assistant", "content": ...}]``): both
forms are accepted, as are prompts given as strings or as lists of chat messages.

Config strings (``build_reward_funcs``)::

    "length"            length_reward()             shorter is better; an empty answer scores lowest
    "length:120"        length_reward(max_chars=120)
    "regex:^yes"        regex_reward("^yes")        1 when the pattern matches, else 0
    "contains_code"     contains_code_reward()      1 when the completion has a fenced code block
    "model"             reward_model_reward(...)    a sequence-classification reward model (passed in)

Trainers also pass ``completion_ids``: each answer's token ids as sampled, ending in an end-of-sequence token only
when the policy emitted one. The reward model reads them to keep a cut-off answer cut off, and
``missing_eos_reward`` (the RLOO side of ``missing_eos_penalty``) to penalise it. The PPO trainer, which cuts the
answers itself, passes its verdict as ``finished`` flags, which the reward model takes over the ids.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

RewardFunc = Callable[..., list[float]]

DEFAULT_MAX_CHARS = 200
EMPTY_ANSWER_REWARD = -1.0  # the length reward of a blank answer: below the 0..1 of any answer with text
FENCED_CODE_BLOCK = re.compile(r"```[^\n`]*\n.*?```", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is, or the content of the last message of a message list."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"]) if completion else ""


def prompt_messages(prompt: Any) -> list[dict[str, str]]:
    """A prompt as chat messages: a plain string becomes one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def length_reward(max_chars: int = DEFAULT_MAX_CHARS) -> RewardFunc:
    """Shorter is better, but saying nothing is worst.

    Scale: a non-blank answer scores ``1 - n / max_chars`` floored at 0, where ``n`` counts its characters without
    surrounding whitespace: just under 1 for one character, falling linearly to 0 at ``max_chars`` and beyond. An
    empty or whitespace-only answer scores ``EMPTY_ANSWER_REWARD`` (-1), below every answer that says something, as
    the ``shorter`` judge ranks it below any non-empty one: otherwise a policy learns to answer with EOS alone.
    Linear (not a step) so that every character saved is rewarded and sampled completions of different lengths
    always get different rewards, which is what a policy gradient learns from.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")

    def score(text: str) -> float:
        characters = len(text.strip())
        return max(0.0, 1.0 - characters / max_chars) if characters else EMPTY_ANSWER_REWARD

    def length(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [score(completion_text(c)) for c in completions]

    length.__name__ = "length"
    return length


def regex_reward(pattern: str) -> RewardFunc:
    """1.0 for a completion in which ``pattern`` matches (``re.search``, multiline), else 0.0."""
    compiled = re.compile(pattern, re.MULTILINE)

    def regex(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [1.0 if compiled.search(completion_text(c)) else 0.0 for c in completions]

    regex.__name__ = "regex"
    return regex


def contains_code_reward() -> RewardFunc:
    """1.0 for a completion containing a closed fenced code block (```` ```lang\\n...``` ````), else 0.0."""

    def contains_code(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [1.0 if FENCED_CODE_BLOCK.search(completion_text(c)) else 0.0 for c in completions]

    contains_code.__name__ = "contains_code"
    return contains_code


def answers_finished(completion_ids: Sequence[Sequence[int]] | None, count: int,
                     end_ids: Sequence[int]) -> list[bool]:
    """Whether each answer ended with an end-of-sequence token (trainers cut an answer after its first one). Without
    ``completion_ids`` the answers are whole texts (human-written pairs, an evaluation's answers): all finished."""
    if completion_ids is None:
        return [True] * count
    if len(completion_ids) != count:
        raise ValueError(f"{len(completion_ids)} completion_ids for {count} completions")
    return [bool(ids) and ids[-1] in end_ids for ids in completion_ids]


def reward_model_text(tokenizer: Any, prompt: Any, answer: str, finished: bool = True) -> str:
    """What the reward model reads: a finished answer rendered as TRL's reward trainer renders a conversation (the
    chat template over prompt and assistant turn, which closes the turn); an unfinished one as the prompt with the
    generation prompt and the answer's text as produced, with no end-of-turn token, so it still reads as cut off."""
    messages = prompt_messages(prompt)
    if finished:
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer


def reward_model_reward(model: Any, tokenizer: Any, batch_size: int = 8, end_ids: Sequence[int] | None = None,
                        max_length: int | None = None) -> RewardFunc:
    """Score each (prompt, completion) with a sequence-classification reward model (``num_labels=1``).

    The text is :func:`reward_model_text`: a finished answer exactly as TRL's reward trainer renders its pairs, a
    truncated one (``completion_ids`` not ending in one of ``end_ids``, the policy's end-of-sequence ids; default:
    the reward tokenizer's EOS, right when policy and reward model share a tokenizer) left open. A caller that
    knows which answers ended without their ids (an evaluation's answers) passes ``finished`` flags instead. Tokenized without
    extra special tokens; ``max_length`` keeps a longer text's last tokens (the answer's end, where the model pools);
    right-padded; the model pools the last non-padding token. Runs in batches of ``batch_size``, without gradients,
    on the model's device.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    ends = list(end_ids) if end_ids is not None else [tokenizer.eos_token_id]

    def reward_model(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                     finished: Sequence[bool] | None = None, **kwargs: Any) -> list[float]:
        import torch

        if finished is None:
            finished = answers_finished(completion_ids, len(completions), ends)
        texts = [reward_model_text(tokenizer, p, completion_text(c), done)
                 for p, c, done in zip(prompts, completions, finished, strict=True)]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        if max_length is not None:
            ids = [row[-max_length:] for row in ids]
        device = next(model.parameters()).device
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                batch = tokenizer.pad({"input_ids": ids[start : start + batch_size]}, padding=True,
                                      padding_side="right", return_tensors="pt").to(device)
                scores.extend(model(**batch).logits[:, 0].float().tolist())
        return scores

    reward_model.__name__ = "reward_model"
    return reward_model


def missing_eos_reward(penalty: float, end_ids: Sequence[int]) -> RewardFunc:
    """``-penalty`` for an answer that stopped at the token limit without an end-of-sequence token, else 0.

    TRL's RLOO trainer has no missing-EOS penalty (PPO's trainer has its own); added as one more reward function
    (weight 1) it lowers a cut-off answer's summed reward, so running out of tokens never pays. Needs
    ``completion_ids``, which TRL's trainers pass.
    """
    if penalty < 0:
        raise ValueError(f"penalty must be non-negative, got {penalty}")
    ends = list(end_ids)

    def missing_eos(prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None,
                    **kwargs: Any) -> list[float]:
        if completion_ids is None:
            raise ValueError("missing_eos needs completion_ids (the sampled token ids) to tell a cut-off answer")
        return [0.0 if done else -penalty for done in answers_finished(completion_ids, len(completions), ends)]

    missing_eos.__name__ = "missing_eos"
    return missing_eos


def build_reward_funcs(
    spec: Sequence[str],
    reward_model: Any = None,
    reward_tokenizer: Any = None,
    reward_batch_size: int = 8,
    end_ids: Sequence[int] | None = None,
) -> list[RewardFunc]:
    """Reward functions from config strings (see the module docstring); ``"model"`` needs ``reward_model`` and
    ``reward_tokenizer`` (and the policy's ``end_ids``, see :func:`reward_model_reward`). Raises ``ValueError``
    naming the offending entry."""
    if isinstance(spec, str):
        raise ValueError(f"reward spec must be a list of strings, got the string {spec!r}")
    if not spec:
        raise ValueError("reward spec is empty: name at least one reward source")
    funcs = []
    for entry in spec:
        name, _, argument = str(entry).partition(":")
        if name == "length":
            try:
                funcs.append(length_reward(int(argument)) if argument else length_reward())
            except ValueError as exc:
                raise ValueError(f"reward {entry!r}: 'length:<max_chars>' needs a positive integer ({exc})") from None
        elif name == "regex":
            if not argument:
                raise ValueError(f"reward {entry!r}: 'regex:<pattern>' needs a pattern")
            try:
                funcs.append(regex_reward(argument))
            except re.error as exc:
                raise ValueError(f"reward {entry!r}: invalid regular expression ({exc})") from None
        elif name == "contains_code" and not argument:
            funcs.append(contains_code_reward())
        elif name == "model" and not argument:
            if reward_model is None or reward_tokenizer is None:
                raise ValueError(f"reward {entry!r} needs a reward model and its tokenizer, and none was given")
            funcs.append(reward_model_reward(reward_model, reward_tokenizer, reward_batch_size, end_ids))
        else:
            raise ValueError(
                f"unknown reward {entry!r}; known: 'length[:max_chars]', 'regex:<pattern>', 'contains_code', 'model'"
            )
    return funcs
