"""The prompt helpers every layer shares: normalize_prompt, as_messages, render_prompt, last_user_turn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from alignment_pipelines.data.records import read_records, write_records
from alignment_pipelines.data.schemas import (
    ReasonCode,
    RowError,
    as_messages,
    last_user_turn,
    normalize_prompt,
    render_prompt,
)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tea?"}]


def test_normalize_prompt_accepts_a_string_lists_and_arrays_from_parquet(tmp_path):
    assert normalize_prompt("Tea?") == [{"role": "user", "content": "Tea?"}]
    assert normalize_prompt(CHAT) == CHAT
    assert normalize_prompt(tuple(CHAT)) == CHAT
    assert normalize_prompt(np.array(CHAT, dtype=object)) == CHAT
    assert normalize_prompt([{**CHAT[1], "name": "x"}]) == [CHAT[1]]  # extra keys dropped
    path = write_records(pd.DataFrame([{"row": 1, "prompt": CHAT}]), tmp_path / "p.parquet")
    raw = pd.read_parquet(path)["prompt"][0]  # what pandas gives back: a numpy array of dicts
    assert isinstance(raw, np.ndarray) and normalize_prompt(raw) == CHAT
    assert read_records(path)["prompt"][0] == CHAT


@pytest.mark.parametrize("prompt, reason, words", [
    (CHAT[:3], ReasonCode.INVALID_CONVERSATION, "must end with a user turn"),
    ([], ReasonCode.EMPTY_FIELD, "has no messages"),
    (3, ReasonCode.WRONG_TYPE, "must be a string or a list of messages"),
    (None, ReasonCode.WRONG_TYPE, "must be a string or a list of messages"),
    (["Hi"], ReasonCode.WRONG_TYPE, "prompt[0] must be an object"),
    ([{"role": "user"}], ReasonCode.MISSING_FIELD, "needs 'role' and 'content'"),
    ([{"role": "user", "content": 5}], ReasonCode.WRONG_TYPE, "must be strings"),
    ([{"role": "robot", "content": "x"}], ReasonCode.INVALID_CONVERSATION, "unknown role 'robot'"),
])
def test_normalize_prompt_rejects_with_a_reason_naming_the_row(prompt, reason, words):
    with pytest.raises(ValueError, match="^row 7: ") as caught:
        normalize_prompt(prompt, row=7)
    assert isinstance(caught.value, RowError) and caught.value.reason == reason
    assert words in caught.value.detail and words in str(caught.value)
    with pytest.raises(RowError) as caught:
        normalize_prompt(prompt)
    assert str(caught.value) == caught.value.detail  # without a row, the message is the detail alone


def test_render_prompt_and_last_user_turn():
    assert render_prompt("Tea?") == "user: Tea?"
    assert render_prompt(CHAT) == "system: Be brief.\n\nuser: Hi\n\nassistant: Hello.\n\nuser: Tea?"
    assert last_user_turn(CHAT) == "Tea?" and last_user_turn("Tea?") == "Tea?"
    assert last_user_turn(CHAT[:3]) == "Hi"  # lenient: the last user turn, wherever it is
    assert last_user_turn([]) == "" and last_user_turn(None) == ""
    assert as_messages(None) == [] and as_messages(np.array(CHAT, dtype=object)) == CHAT
