"""Reward sources for the online methods (PPO, RLOO, ...), in TRL's reward-function convention.

A reward function is called as ``reward_fn(prompts=..., completions=..., **kwargs) -> list[float]`` with
one reward per completion, and has a ``__name__`` (used in metric names such as ``rewards/<name>/mean``).
The same functions work in the project's PPO trainer (completions are strings) and in TRL's RLOO/GRPO
trainers (completions of conversational prompts are ``[{"role": "assistant", "content": ...}]``): both
forms are accepted, as are prompts given as strings or as lists of chat messages.

Config strings (``build_reward_funcs``)::

    "length"            length_reward()             shorter is better
    "length:120"        length_reward(max_chars=120)
    "regex:^yes"        regex_reward("^yes")        1 when the pattern matches, else 0
    "contains_code"     contains_code_reward()      1 when the completion has a fenced code block
    "model"             reward_model_reward(...)    a sequence-classification reward model (passed in)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

RewardFunc = Callable[..., list[float]]

DEFAULT_MAX_CHARS = 200
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
    """Shorter is better: 1 for an empty completion, falling linearly to 0 at ``max_chars`` characters and beyond.

    Linear (not a step) so that every character saved is rewarded and sampled completions of different
    lengths always get different rewards, which is what a policy gradient learns from.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")

    def length(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return [max(0.0, 1.0 - len(completion_text(c)) / max_chars) for c in completions]

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


def reward_model_reward(model: Any, tokenizer: Any, batch_size: int = 8) -> RewardFunc:
    """Score each (prompt, completion) with a sequence-classification reward model (``num_labels=1``).

    The text is rendered exactly as TRL's reward trainer and RLOO trainer render it: the chat template over
    the prompt messages plus the completion as an assistant turn, tokenized without extra special tokens,
    right-padded; the model pools the last non-padding token. Runs in batches of ``batch_size``, without
    gradients, on the model's device.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    def reward_model(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        import torch

        texts = [
            tokenizer.apply_chat_template(
                prompt_messages(p) + [{"role": "assistant", "content": completion_text(c)}], tokenize=False
            )
            for p, c in zip(prompts, completions, strict=True)
        ]
        device = next(model.parameters()).device
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(
                    texts[start : start + batch_size],
                    return_tensors="pt",
                    padding=True,
                    padding_side="right",
                    add_special_tokens=False,
                ).to(device)
                scores.extend(model(**batch).logits[:, 0].float().tolist())
        return scores

    reward_model.__name__ = "reward_model"
    return reward_model


def build_reward_funcs(
    spec: Sequence[str],
    reward_model: Any = None,
    reward_tokenizer: Any = None,
    reward_batch_size: int = 8,
) -> list[RewardFunc]:
    """Reward functions from config strings (see the module docstring); ``"model"`` needs ``reward_model`` and
    ``reward_tokenizer``. Raises ``ValueError`` naming the offending entry."""
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
            funcs.append(reward_model_reward(reward_model, reward_tokenizer, reward_batch_size))
        else:
            raise ValueError(
                f"unknown reward {entry!r}; known: 'length[:max_chars]', 'regex:<pattern>', 'contains_code', 'model'"
            )
    return funcs
