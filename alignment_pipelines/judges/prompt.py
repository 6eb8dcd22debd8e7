"""The judge prompt that LLM judges (local and remote) answer with one letter, A or B.

The user's instruction (e.g. "helpful and very short", "always include code") is the
criterion, and it sits in the closing question: a truncated prompt loses its start, never
the question, and small models follow a criterion best right before they answer.
"""

from __future__ import annotations

from alignment_pipelines.judges.base import Prompt

JUDGE_TEMPLATE = """\
Two assistants answered the conversation below. Compare their answers.

[Conversation]
{conversation}

[Answer A]
{first}

[Answer B]
{second}

Judged by this criterion: {instruction}. Which answer is better, A or B? Reply with the single letter A or B."""


def render_conversation(prompt: Prompt) -> str:
    """A conversation as plain ``Role: content`` lines (a string prompt is one user turn)."""
    if isinstance(prompt, str):
        return f"User: {prompt}"
    return "\n".join(f"{message['role'].capitalize()}: {message['content']}" for message in prompt)


def render_judge_prompt(instruction: str, prompt: Prompt, first: str, second: str) -> str:
    """The judge's question for one pair in one order: ``first`` is shown as A, ``second`` as B."""
    return JUDGE_TEMPLATE.format(
        conversation=render_conversation(prompt), first=first, second=second, instruction=instruction.strip().rstrip(".")
    )


def check_instruction(instruction: str) -> str:
    """Reject an empty instruction: it is the judge's criterion and part of its id."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"instruction must be a non-empty string (the judging criterion), got {instruction!r}")
    return instruction.strip()
