"""Row layouts: what one parsed row may look like, and its conversion into a canonical record.

Names accepted by `layout=`, and the kind of records each produces:

pairwise       {"prompt": str, "chosen": str, "rejected": str}                       -> pairwise
conversational {"prompt": [messages], "chosen": [assistant msg], "rejected": [...]}
               or TRL's implicit prompt: chosen/rejected are whole conversations      -> pairwise
hh-rlhf        {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}      -> pairwise
ultrafeedback  {"instruction"|"prompt": ..., "completions": [{"response", "overall_score"|...}]}
               or {"prompt", "responses": [...], "scores": [...]}; chosen = best score,
               rejected = lowest score (ties: first)                                  -> pairwise
binary         TRL unpaired preference {"prompt", "completion", "label": bool}        -> binary
chat-log       OpenAI-style {"messages": [..., final assistant msg], "thumbs"|"feedback"|
               "rating"|"thumbs_up"|"label"|"vote": up/down}                          -> binary
messages       TRL conversational LM {"messages": [...]}: the conversation up to its
               last user turn becomes a prompt                                        -> prompts
prompts        {"prompt": str | [messages]} (a "completion" without a label is ignored) -> prompts

A row that cannot be converted raises RowError with its ReasonCode (the chunk it is in quarantines it).
Prompts and message lists are checked by `schemas.normalize_prompt` / `normalize_messages` (shape, roles,
a prompt ending with a user turn).
"""

from __future__ import annotations

import re
from typing import Any

from alignment_pipelines.data.schemas import Message, ReasonCode, RowError, normalize_messages, normalize_prompt

HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _answer(value: Any, field: str, conversational: bool) -> str:
    if isinstance(value, str):
        return value
    if conversational and isinstance(value, list):
        msgs = normalize_messages(value, field)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise RowError(ReasonCode.INVALID_CONVERSATION, f"{field} must be exactly one assistant message")
        return msgs[0]["content"]
    expected = "a string or a list with one assistant message" if conversational else "a string"
    raise RowError(ReasonCode.WRONG_TYPE, f"{field} must be {expected}, got {type(value).__name__}")


def split_hh(transcript: str, field: str) -> tuple[list[Message], str]:
    parts = HH_TURN.split(transcript)
    # parts = [preamble, role, text, role, text, ...]
    if len(parts) < 3:
        raise RowError(ReasonCode.UNKNOWN_LAYOUT, f"{field} has no '\\n\\nHuman:'/'\\n\\nAssistant:' turns")
    if parts[0].strip():
        raise RowError(ReasonCode.UNKNOWN_LAYOUT, f"{field} has text before the first turn")
    turns = [(HH_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if turns[-1][0] != "assistant":
        raise RowError(ReasonCode.INVALID_CONVERSATION, f"{field} does not end with an Assistant turn")
    prompt: list[Message] = [{"role": r, "content": c} for r, c in turns[:-1]]
    if not prompt:
        raise RowError(ReasonCode.INVALID_CONVERSATION, f"{field} has no Human turn before the answer")
    return prompt, turns[-1][1]


def _convert(obj: Any) -> tuple[list[Message], str, str]:
    """One parsed JSON value -> (prompt messages, chosen, rejected) or RowError."""
    if not isinstance(obj, dict):
        raise RowError(ReasonCode.NOT_AN_OBJECT, f"a row must be a JSON object, got {type(obj).__name__}")
    known = {"prompt", "chosen", "rejected"} & obj.keys()
    if not known:
        keys = ", ".join(sorted(map(str, obj.keys())))[:200] or "none"
        raise RowError(ReasonCode.UNKNOWN_LAYOUT, f"no prompt/chosen/rejected fields (keys: {keys})")
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise RowError(ReasonCode.MISSING_FIELD, f"missing field(s): {', '.join(missing)}")
    chosen, rejected = obj["chosen"], obj["rejected"]

    if "prompt" in obj:  # (a) a string prompt with string answers, or (b) messages
        conversational = not isinstance(obj["prompt"], str)
        return (normalize_prompt(obj["prompt"]), _answer(chosen, "chosen", conversational),
                _answer(rejected, "rejected", conversational))

    if isinstance(chosen, list) and isinstance(rejected, list):  # (b) implicit prompt
        c, r = normalize_messages(chosen, "chosen"), normalize_messages(rejected, "rejected")
        if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise RowError(ReasonCode.INVALID_CONVERSATION, "chosen and rejected must end with an assistant turn")
        if c[:-1] != r[:-1]:
            raise RowError(ReasonCode.PROMPT_MISMATCH, "chosen and rejected conversations differ before the final turn")
        return normalize_prompt(c[:-1]), c[-1]["content"], r[-1]["content"]

    if isinstance(chosen, str) and isinstance(rejected, str):  # (c) HH-RLHF
        if "\n\nAssistant:" not in chosen and "\n\nAssistant:" not in rejected:
            raise RowError(
                ReasonCode.UNKNOWN_LAYOUT,
                "no prompt field and chosen/rejected are not Human/Assistant transcripts",
            )
        c_prompt, c_answer = split_hh(chosen, "chosen")
        r_prompt, r_answer = split_hh(rejected, "rejected")
        if c_prompt != r_prompt:
            turn = next(
                (i for i, (a, b) in enumerate(zip(c_prompt, r_prompt)) if a != b), min(len(c_prompt), len(r_prompt))
            )
            raise RowError(
                ReasonCode.PROMPT_MISMATCH,
                f"chosen and rejected transcripts differ before the final turn (first at turn {turn + 1})",
            )
        return normalize_prompt(c_prompt), c_answer, r_answer

    bad = "chosen" if not isinstance(chosen, (str, list)) else "rejected"
    raise RowError(
        ReasonCode.WRONG_TYPE,
        f"{bad} must be a string or a list of messages, got {type(obj[bad]).__name__}"
        if not isinstance(obj[bad], (str, list))
        else "chosen and rejected must have the same shape (both strings or both message lists)",
    )


# --------------------------------------------------------------------------- other layouts

THUMBS_FIELDS = ("thumbs", "thumb", "thumbs_up", "feedback", "rating", "vote", "label")
_UP = {"up", "thumbs_up", "thumbs-up", "thumbsup", "+1", "1", "👍", "positive", "good", "like", "liked", "true", "yes"}
_DOWN = {"down", "thumbs_down", "thumbs-down", "thumbsdown", "-1", "0", "👎", "negative", "bad", "dislike", "disliked",
         "false", "no"}
SCORE_FIELDS = ("overall_score", "score", "rating", "fine-grained_score")


def _convert_binary(obj: dict) -> dict[str, Any]:
    missing = [k for k in ("prompt", "completion", "label") if k not in obj]
    if missing:
        raise RowError(ReasonCode.MISSING_FIELD, f"missing field(s): {', '.join(missing)}")
    prompt = normalize_prompt(obj["prompt"])
    completion = _answer(obj["completion"], "completion", isinstance(obj["prompt"], list))
    label = obj["label"]
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):  # CSV has no booleans
        label = label.strip().lower() == "true"
    # a label of another type is passed on: the suite's "label is a boolean" rule quarantines it
    return {"prompt": prompt, "completion": completion, "label": label}


def _thumbs(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (1, -1, 0):
        return value == 1
    if isinstance(value, str) and value.strip().lower() in _UP | _DOWN:
        return value.strip().lower() in _UP
    if isinstance(value, dict):  # {"thumbs": {"value": "up"}} / {"feedback": {"rating": "down"}}
        for key in ("value", "rating", "type", "thumbs", "score"):
            if key in value:
                return _thumbs(value[key], f"{field}.{key}")
    raise RowError(ReasonCode.WRONG_TYPE, f"{field} must be thumbs up/down (bool, 'up'/'down', 1/-1), got {value!r:.60}")


def _convert_chat_log(obj: dict) -> dict[str, Any]:
    msgs = normalize_messages(obj.get("messages"), "messages")
    if not msgs or msgs[-1]["role"] != "assistant":
        raise RowError(ReasonCode.INVALID_CONVERSATION, "messages must end with the assistant answer that was rated")
    prompt = msgs[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError(ReasonCode.INVALID_CONVERSATION, "the rated answer must follow a user turn")
    field = next((f for f in THUMBS_FIELDS if f in obj), None)
    if field is None:
        raise RowError(ReasonCode.MISSING_FIELD, f"no thumbs field (one of {', '.join(THUMBS_FIELDS)})")
    return {"prompt": prompt, "completion": msgs[-1]["content"], "label": _thumbs(obj[field], field)}


def _convert_messages(obj: dict) -> dict[str, Any]:
    msgs = normalize_messages(obj.get("messages"), "messages")
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise RowError(ReasonCode.INVALID_CONVERSATION, "messages has no user turn")
    return {"prompt": msgs[: last_user + 1]}


def _convert_prompts(obj: dict) -> dict[str, Any]:
    if "prompt" not in obj:
        raise RowError(ReasonCode.MISSING_FIELD, "missing field: prompt")
    return {"prompt": normalize_prompt(obj["prompt"])}


def _score(value: Any, where: str) -> float:
    if isinstance(value, dict):  # UltraFeedback annotations: {"Rating": "4", ...}
        value = value.get("Rating", value.get("rating"))
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RowError(ReasonCode.WRONG_TYPE, f"{where} must be a number, got {value!r:.40}")
    try:
        return float(value)
    except OverflowError as exc:  # an integer beyond the float range
        raise RowError(ReasonCode.WRONG_TYPE, f"{where} is out of the float range") from exc


def _convert_ultrafeedback(obj: dict) -> dict[str, Any]:
    prompt_field = next((f for f in ("prompt", "instruction") if f in obj), None)
    if prompt_field is None:
        raise RowError(ReasonCode.MISSING_FIELD, "missing field: prompt (or instruction)")
    prompt = normalize_prompt(obj[prompt_field], field=prompt_field)
    answers: list[tuple[str, float]] = []
    if "completions" in obj:
        comps = obj["completions"]
        if not isinstance(comps, list):
            raise RowError(ReasonCode.WRONG_TYPE, f"completions must be a list, got {type(comps).__name__}")
        for i, comp in enumerate(comps):
            if not isinstance(comp, dict):
                raise RowError(ReasonCode.WRONG_TYPE, f"completions[{i}] must be an object")
            text = comp.get("response", comp.get("text", comp.get("completion")))
            if not isinstance(text, str):
                raise RowError(ReasonCode.WRONG_TYPE, f"completions[{i}] needs a string 'response'")
            field = next((f for f in SCORE_FIELDS if f in comp), None)
            if field is None:
                raise RowError(ReasonCode.MISSING_FIELD, f"completions[{i}] has no score ({', '.join(SCORE_FIELDS)})")
            answers.append((text, _score(comp[field], f"completions[{i}].{field}")))
    else:
        responses, scores = obj.get("responses"), obj.get("scores")
        if not isinstance(responses, list) or not isinstance(scores, list):
            raise RowError(ReasonCode.WRONG_TYPE, "responses and scores must be lists")
        if len(responses) != len(scores):
            raise RowError(ReasonCode.WRONG_TYPE, f"{len(responses)} responses but {len(scores)} scores")
        for i, (text, score) in enumerate(zip(responses, scores)):
            answers.append((_answer(text, f"responses[{i}]", True), _score(score, f"scores[{i}]")))
    if len(answers) < 2:
        raise RowError(ReasonCode.MISSING_FIELD, f"needs at least 2 scored responses, got {len(answers)}")
    best = max(range(len(answers)), key=lambda i: (answers[i][1], -i))
    worst = min(range(len(answers)), key=lambda i: (answers[i][1], i))
    if answers[best][1] == answers[worst][1]:
        raise RowError(ReasonCode.NO_PREFERENCE, f"all {len(answers)} responses have the same score")
    return {"prompt": prompt, "chosen": answers[best][0], "rejected": answers[worst][0]}


def _convert_pairwise(obj: dict) -> dict[str, Any]:
    prompt, chosen, rejected = _convert(obj)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# layout -> (kind, converter); pairwise, conversational and hh-rlhf share one converter
LAYOUTS: dict[str, tuple[str, Any]] = {
    "pairwise": ("pairwise", _convert_pairwise),
    "conversational": ("pairwise", _convert_pairwise),
    "hh-rlhf": ("pairwise", _convert_pairwise),
    "ultrafeedback": ("pairwise", _convert_ultrafeedback),
    "binary": ("binary", _convert_binary),
    "chat-log": ("binary", _convert_chat_log),
    "messages": ("prompts", _convert_messages),
    "prompts": ("prompts", _convert_prompts),
}


def detect_layout(obj: Any) -> str | None:
    """The layout a parsed row looks like (from its field names), or None."""
    if not isinstance(obj, dict):
        return None
    if "chosen" in obj or "rejected" in obj:
        if "prompt" in obj:
            return "conversational" if isinstance(obj["prompt"], list) else "pairwise"
        if "completions" in obj or "responses" in obj:
            return "ultrafeedback"
        return "conversational" if isinstance(obj.get("chosen"), list) else "hh-rlhf"
    if "completions" in obj or ("responses" in obj and "scores" in obj):
        return "ultrafeedback"
    if "completion" in obj and "label" in obj:
        return "binary"
    if "messages" in obj:
        return "chat-log" if any(f in obj for f in THUMBS_FIELDS) else "messages"
    if "prompt" in obj:
        return "prompts"
    return None


def loose_match(layout: str, obj: dict) -> bool:
    """Does a row belong to the file's layout, even with fields missing? (for precise reasons)"""
    kind = LAYOUTS[layout][0]
    if kind == "pairwise":
        return detect_layout(obj) in ("pairwise", "conversational", "hh-rlhf", "ultrafeedback")
    if layout == "binary":
        return ("completion" in obj or "label" in obj) and "chosen" not in obj and "rejected" not in obj
    if layout in ("chat-log", "messages"):
        return "messages" in obj
    return detect_layout(obj) == "prompts"


def check_layout(layout: str | None) -> str | None:
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
    return layout

