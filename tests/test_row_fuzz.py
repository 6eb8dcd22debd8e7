"""No single row can fail a batch: hostile JSON values in every field of every layout, through every reader,
each land accepted or quarantined (accepted + quarantined = input), differentially against `json.loads`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from alignment_pipelines.cli import main
from alignment_pipelines.data.validate.engine import validate_file_to_parquet
from alignment_pipelines.data.validate.rules import ValidationRules

USER = {"role": "user", "content": "What is the capital of France?"}
ANSWER, WORSE = "Paris is the capital of France.", "I am not sure, maybe Lyon."
TEMPLATES = {  # a valid row of each layout
    "pairwise": {"prompt": USER["content"], "chosen": ANSWER, "rejected": WORSE},
    "conversational": {"prompt": [USER], "chosen": [{"role": "assistant", "content": ANSWER}],
                       "rejected": [{"role": "assistant", "content": WORSE}]},
    "hh-rlhf": {"chosen": f"\n\nHuman: {USER['content']}\n\nAssistant: {ANSWER}",
                "rejected": f"\n\nHuman: {USER['content']}\n\nAssistant: {WORSE}"},
    "ultrafeedback": {"instruction": USER["content"], "completions": [{"response": ANSWER, "overall_score": 9},
                                                                      {"response": WORSE, "overall_score": 2.5}]},
    "binary": {"prompt": USER["content"], "completion": ANSWER, "label": True},
    "chat-log": {"messages": [USER, {"role": "assistant", "content": ANSWER}], "thumbs": "up"},
    "messages": {"messages": [USER, {"role": "assistant", "content": ANSWER}]},
    "prompts": {"prompt": USER["content"]},
}
VALID_ROWS = 3


class Raw:
    """A JSON text put in a row as it is: what no Python value serializes to (a 5,000-digit integer, NaN)."""

    def __init__(self, text: str):
        self.text = text

    def value(self):
        """The value `json.loads` reads from the text (an integer Python will not convert from so many digits:
        the digits), or the exception it raises."""
        try:
            return json.loads(self.text, parse_int=lambda digits: int(digits) if len(digits) <= 4300 else digits)
        except (ValueError, RecursionError) as exc:
            return exc


def dump(value) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def paths(value, prefix=()):
    """Every place in a row a value can be put: each field, each list element, each nested field."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from paths(child, (*prefix, key))


def put(row, path, hostile):
    """A copy of `row` with `hostile` at `path`."""
    if not path:
        return hostile
    copy = dict(row) if isinstance(row, dict) else list(row)
    copy[path[0]] = put(copy[path[0]], path[1:], hostile)
    return copy


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
hostile_texts = st.one_of(
    st.integers(4301, 6000).map(lambda digits: "9" * digits),  # past Python's int-string limit
    st.integers(4301, 5000).map(lambda digits: "-1" + "0" * digits),
    st.sampled_from(["1e999", "-1e400", "1" + "0" * 400, "1" + "0" * 400 + ".5", "NaN", "Infinity", "-Infinity",
                     '"NaN"', '"1e999"', '"' + "9" * 5000 + '"', '"\\ud800"', '"a\\udfff b"', '"\\u0000"', '""',
                     '"   "', "[]", "{}", "null", "true", "0", "-1", str(2 ** 63), str(2 ** 64), "1.5",
                     '{"role": "user"}', '[{"role": "user", "content": 1}]', '"\\n\\nHuman:"']),
    st.sampled_from([10, 100, 100_000]).map(lambda n: "[" * n + "]" * n),  # 100,000: past the parser's recursion limit
    st.just('{"a": ' * 3000 + "1" + "}" * 3000),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False)),
).map(Raw)


@st.composite
def batches(draw):
    """A layout, and rows of it: valid ones and 1-3 with a hostile value somewhere, in any order."""
    layout = draw(st.sampled_from(sorted(TEMPLATES)))
    template = TEMPLATES[layout]
    where = sorted(paths(template), key=repr)
    hostile = [put(template, draw(st.sampled_from(where)), draw(hostile_texts)) for _ in range(draw(st.integers(1, 3)))]
    rows = [template] * VALID_ROWS + hostile
    return layout, draw(st.permutations(rows))


def check(path: Path, tmp: Path, rows_in: int, rules: ValidationRules = ValidationRules()) -> dict:
    """Validate `path`: it must not raise, and every row must be accepted or quarantined."""
    summary = validate_file_to_parquet(path, tmp / "a.parquet", tmp / "q.parquet", rules)
    assert summary["rows"] == rows_in
    assert summary["accepted"] + summary["quarantined"] == rows_in
    assert pq.read_metadata(tmp / "a.parquet").num_rows == summary["accepted"]
    assert pq.read_metadata(tmp / "q.parquet").num_rows == summary["quarantined"]
    return summary


FUZZ = settings(max_examples=75, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


@FUZZ
@given(batch=batches(), screened=st.booleans())
def test_jsonl_rows(tmp_path, batch, screened):
    """The Arrow fast path, or (PII screening on) the row-by-row importer."""
    _, rows = batch
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(dump(row) + "\n" for row in rows), encoding="utf-8")
    check(path, tmp_path, len(rows), ValidationRules(pii="redact" if screened else "off"))


@FUZZ
@given(batch=batches())
def test_json_array_rows(tmp_path, batch):
    """A JSON array is parsed element by element: an element `json.loads` cannot read ends the array there
    (the rest is one quarantined row, as the importer documents), anything else (an integer too long to
    convert included) is a row of its own."""
    _, rows = batch
    path = tmp_path / "rows.json"
    path.write_text("[\n" + ",\n".join(dump(row) for row in rows) + "\n]", encoding="utf-8")
    broken = next((i for i, row in enumerate(rows) if isinstance(Raw(dump(row)).value(), Exception)), None)
    check(path, tmp_path, len(rows) if broken is None else broken + 1)


def csv_cell(value) -> str:
    """A value as a CSV cell: a string as it is, anything else as its JSON text."""
    if isinstance(value, Raw) and isinstance(value.value(), str):
        return value.value()
    return value if isinstance(value, str) else dump(value)


@FUZZ
@given(batch=batches())
def test_csv_rows(tmp_path, batch):
    """A CSV cell holds a string as it is and any other value as JSON text (read back as JSON where the
    column holds messages or answers)."""
    _, rows = batch
    header = list(rows[0])
    lines = [[csv_cell(row[k]) for k in header] for row in rows]
    assume(all("\x00" not in cell and not any(0xD800 <= ord(c) < 0xE000 for c in cell) for line in lines for cell in line))
    path = tmp_path / "rows.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *lines])
    check(path, tmp_path, sum(1 for line in lines if any(cell.strip() for cell in line)))


@FUZZ
@given(batch=batches())
def test_parquet_rows(tmp_path, batch):
    """Parquet holds typed columns: the rows whose values Arrow can store in one table (a column of one
    type), with the hostile values `json.loads` reads (an integer past int64, or one column of mixed types,
    cannot be written, so such a batch is left out)."""
    layout, rows = batch
    for candidate in (rows, [row for row in rows if row is not TEMPLATES[layout]]):  # with the valid rows, or without
        values = [Raw(dump(row)).value() for row in candidate]
        if any(isinstance(v, Exception) for v in values):
            continue
        try:
            table = pa.Table.from_pylist(values)
            pq.write_table(table, path := tmp_path / "rows.parquet")
        except (pa.ArrowException, OverflowError, TypeError, ValueError):
            continue
        break
    else:
        assume(False)
    check(path, tmp_path, table.num_rows)


# --------------------------------------------------------------------------- the review's two examples


LONG_INT = "9" * 4301


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_an_integer_past_the_conversion_limit_is_one_quarantined_row(tmp_path, suffix, capsys):
    good = TEMPLATES["pairwise"]
    bad = {**good, "chosen": Raw(LONG_INT)}
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        path.write_text(f"{dump(good)}\n{dump(bad)}\n")
    elif suffix == ".json":
        path.write_text(f"[{dump(bad)}, {dump(good)}]")
    else:
        path.write_text(f'prompt,chosen,rejected\n"{good["prompt"]}",[{LONG_INT}],x\n"{good["prompt"]}",a,b\n')
    summary = check(path, tmp_path, 2)
    assert summary["accepted"] == 1 and summary["quarantined"] == 1
    assert main(["validate", str(path), "--output-dir", str(tmp_path / "cli")]) == 0  # a summary, not a traceback
    assert json.loads(capsys.readouterr().out)["rows"] == 2


def test_an_ultrafeedback_score_past_the_float_range_is_one_quarantined_row(tmp_path):
    good = TEMPLATES["ultrafeedback"]
    bad = {**good, "completions": [{"response": ANSWER, "overall_score": Raw("1" + "0" * 400)},
                                   {"response": WORSE, "overall_score": 1}]}
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{dump(good)}\n{dump(bad)}\n")
    summary = check(path, tmp_path, 2)
    assert summary["by_reason"] == {"wrong_type": 1}
    [row] = pq.read_table(tmp_path / "q.parquet").to_pylist()
    assert row["row"] == 2 and row["detail"] == "completions[0].overall_score is out of the float range"
