"""Feedback at scale: the Arrow-speed paths give exactly what the row-by-row reference gives.

- JSONL read at Arrow speed (plain lines) and routed with vectorised rules == the importers + rules one
  row at a time (`validate_file`), on clean, hostile and randomly mutated lines;
- token counts by pieces == the tokenizer on whole texts;
- the key index finds rows of earlier batches; the SQL datasets == the pandas reference functions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from alignment_pipelines.data import columnar
from alignment_pipelines.data.datasets.sql import BatchFiles, build_dataset
from alignment_pipelines.data.datasets.key_index import KEYS_FILE, KeyIndex, ensure_keys
from alignment_pipelines.data.records import read_records
from alignment_pipelines.data.datasets.splits import (binary_from_pairs, deduplicate, kto_balance, prompt_key,
                                                      prompts_from, record_key, split_by_prompt)
from alignment_pipelines.data.validate.tokens import TokenCounter
from alignment_pipelines.data.validate.engine import validate_file, validate_file_to_parquet
from alignment_pipelines.data.validate.gate import run_expectation_suite, run_expectation_suite_on_file
from alignment_pipelines.data.validate.rules import ValidationRules


def conv(prompt, chosen, rejected, system=None):
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {"prompt": turns, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


HOSTILE = [
    json.dumps(conv("What is 2+2?", "4", "5")),
    json.dumps({"prompt": "Plain?", "chosen": "yes", "rejected": "no"}),
    '{"prompt": "dup keys", "chosen": "a", "rejected": "b", "prompt": "last wins"}',
    '{"prompt": "trailing comma", "chosen": "a", "rejected": "b",}',
    '{"prompt": "extra", "chosen": "a", "rejected": "b", "id": 7}',
    '{"prompt": "lone \\ud800 surrogate", "chosen": "a", "rejected": "b"}',
    '{"prompt": "pair \\ud83d\\ude00 emoji", "chosen": "a", "rejected": "b"}',
    '{"prompt": "nul \\u0000 char", "chosen": "a", "rejected": "b"}',
    '{"prompt": "bell", "chosen": "a\\u0007", "rejected": "b"}',
    '{"prompt": "escaped \\"quote\\" and \\\\ slash \\/", "chosen": "tab\\there", "rejected": "new\\nline"}',
    # backslash runs right before a quote: even runs end the string, odd ones escape the quote
    '{"prompt": "ends in a backslash \\\\", "chosen": "\\\\\\"quoted\\\\\\"", "rejected": "\\\\\\\\"}',
    json.dumps(conv('q \\" \\\\" \\', 'say "\\\\"', "\\\\\\"), ensure_ascii=False),
    '{"prompt": "NaN", "chosen": NaN, "rejected": "b"}',
    '{"prompt": "num", "chosen": 5, "rejected": "b"}',
    '{"prompt": "x", "chosen": "a", "rejected": "b"} trailing',
    '  {"prompt": "spaces around", "chosen": "a", "rejected": "b"}  \r',
    '{"prompt": [{"role": "user", "content": "hi", "content": "dup"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
    '{"prompt": [{"role": "user", "content": "x", "name": "n"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
    '{"prompt": [{"role": "assistant", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
    '{"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
    '{"prompt": [], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}',
    '{"prompt": [{"role": "user", "content": "two answers"}], "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "b"}]}',
    '{"prompt": [{"role": "user", "content": "str answers"}], "chosen": "a", "rejected": "b"}',
    json.dumps(conv("What is 2+2?", "4", "5")),  # duplicate of the first line
    json.dumps(conv(" What is 2+2? ", "4 ", "5")),  # duplicate after normalisation
    json.dumps(conv("Same?", "x", " x ")),  # identical pair after normalisation
    json.dumps(conv("\u3000", "a", "b")),  # blank by Python's \s
    json.dumps(conv("ok", "\x1c", "b")),  # blank too (str.isspace)
    json.dumps(conv("ok", "C1 \x85 control", "b")),
    json.dumps(conv("ok", "e\u0301", "\u00e9")),  # NFC-identical
    json.dumps(conv("long", "x" * 150, "y")),
    json.dumps(conv("Système?", "Réponse", "Autre", system="Be brief.")),
    '{"messages": [{"role": "user", "content": "other kind"}]}',
    '{"input": "x", "output": "y"}',
    '"a string"',
    "[1, 2]",
    "{not json",
    "",
    "   ",
    json.dumps({"prompt": "\n\nHuman: hh inside", "chosen": "a", "rejected": "b"}),
    json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}),
]


def _write(path: Path, lines: list, raw: bytes | None = None) -> Path:
    path.write_bytes(raw if raw is not None else ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    return path


class _Reference:
    """The importers' chunks (row by row) through the routing, chunk after chunk: what the batch gives
    when every line takes the row-by-row path."""

    def __init__(self, path: Path, rules: ValidationRules, chunk_rows: int):
        from alignment_pipelines.data.ingest.chunks import iter_feedback_chunks
        from alignment_pipelines.data.validate.engine import _route
        from alignment_pipelines.data.validate.router import KeySet

        seen = KeySet()
        results = [_route(imported, rules, None, seen) for imported in iter_feedback_chunks(path, chunk_rows=chunk_rows)]
        self.rows = sum(r.rows for r in results)
        self.layout = results[-1].layout
        self.accepted = pd.concat([r.accepted for r in results], ignore_index=True)
        self.quarantined = pd.concat([r.quarantined for r in results], ignore_index=True)

    def counts_by_reason(self) -> dict:
        counts = self.quarantined["reason"].map(str).value_counts()
        return {str(k): int(v) for k, v in sorted(counts.items())}


def _both(tmp_path: Path, path: Path, rules: ValidationRules, chunk_rows: int = 7, **kw):
    summary = validate_file_to_parquet(path, tmp_path / "a.parquet", tmp_path / "q.parquet", rules,
                                       chunk_rows=chunk_rows, keys_path=tmp_path / "k.parquet", **kw)
    reference = _Reference(path, rules, chunk_rows)
    accepted = read_records(tmp_path / "a.parquet")
    quarantine = pd.read_parquet(tmp_path / "q.parquet")
    return summary, accepted, quarantine, reference


def _same(summary, accepted, quarantine, reference):
    assert summary["rows"] == reference.rows
    assert summary["by_reason"] == reference.counts_by_reason()
    assert accepted["row"].tolist() == reference.accepted["row"].tolist()
    assert accepted["prompt"].tolist() == [list(map(dict, p)) for p in reference.accepted["prompt"]]
    for col in [c for c in accepted.columns if c not in ("row", "prompt")]:
        assert accepted[col].tolist() == reference.accepted[col].tolist(), col
    ref_q = reference.quarantined
    assert quarantine["row"].tolist() == ref_q["row"].tolist()
    assert quarantine["reason"].tolist() == [str(r) for r in ref_q["reason"]]
    assert quarantine["detail"].tolist() == ref_q["detail"].tolist()
    assert quarantine["raw"].tolist() == ref_q["raw"].tolist()


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_hostile_lines_come_out_as_the_row_by_row_reference(tmp_path, chunk_rows):
    path = _write(tmp_path / "hostile.jsonl", HOSTILE)
    rules = ValidationRules(max_chars=100)
    _same(*_both(tmp_path, path, rules, chunk_rows=chunk_rows))


def test_invalid_utf8_bom_crlf_and_gzip(tmp_path):
    import gzip

    body = ("\ufeff" + json.dumps(conv("bom", "a", "b")) + "\r\n").encode()
    body += b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n' + b"\xff\xfe\n"
    body += ("\n".join(HOSTILE[:10]) + "\r\n").encode("utf-8", "surrogatepass")
    body += json.dumps(conv("no newline at the end", "a", "b")).encode()
    rules = ValidationRules(max_chars=100)
    _same(*_both(tmp_path, _write(tmp_path / "odd.jsonl", [], body), rules))
    gz = tmp_path / "odd.jsonl.gz"
    gz.write_bytes(gzip.compress(body))
    _same(*_both(tmp_path, gz, rules))


def test_random_mutations_match_the_reference(tmp_path):
    rng = random.Random(7)
    good = [json.dumps(conv(f"Question {i % 40}?", f"Answer {i % 7}.", f"Other {i}.", system="S" if i % 5 == 0 else None))
            for i in range(300)]
    alphabet = ['"', "\\", ",", "}", "]", " ", "\t", "\u3000", "é", "\x07", "u", "{", "[", ":", "\\u00", "\\n", "'"]
    lines = []
    for line in good:
        for _ in range(rng.choice([0, 0, 1, 2])):
            pos = rng.randrange(len(line))
            op = rng.random()
            if op < 0.4:
                line = line[:pos] + rng.choice(alphabet) + line[pos:]
            elif op < 0.8:
                line = line[:pos] + line[pos + 1:]
            else:
                line = line[:pos] + rng.choice(alphabet) + line[pos + 1:]
        lines.append(line)
    path = _write(tmp_path / "mutated.jsonl", lines)
    for rules in (ValidationRules(max_chars=40), ValidationRules()):
        _same(*_both(tmp_path, path, rules, chunk_rows=64))


def test_layout_majority_counts_plain_lines(tmp_path):
    binary = [json.dumps({"prompt": f"Q{i}", "completion": "A", "label": True}) for i in range(3)]
    pairs = [json.dumps(conv(f"P{i}", "a", "b")) for i in range(2)]
    path = _write(tmp_path / "mixed.jsonl", pairs + binary)
    summary, accepted, quarantine, reference = _both(tmp_path, path, ValidationRules())
    assert summary["layout"] == reference.layout == "binary"
    assert summary["by_reason"] == {"layout_mismatch": 2}
    _same(summary, accepted, quarantine, reference)


def test_known_keys_and_key_index_agree(tmp_path):
    first = _write(tmp_path / "first.jsonl", [json.dumps(conv(f"Q{i}", "a", "b")) for i in range(6)])
    s1 = validate_file_to_parquet(first, tmp_path / "b1" / "accepted.parquet", tmp_path / "b1" / "q.parquet",
                                  keys_path=tmp_path / "b1" / KEYS_FILE)
    assert s1["accepted"] == 6
    accepted = read_records(tmp_path / "b1" / "accepted.parquet")
    keys = pd.read_parquet(tmp_path / "b1" / KEYS_FILE)
    assert keys["row"].tolist() == accepted["row"].tolist()
    expected = columnar.key64([record_key(r, "pairwise") for r in accepted.to_dict("records")])
    assert keys["key"].to_numpy().view(np.uint64).tolist() == expected.tolist()
    assert keys["prompt_key"].tolist() == [prompt_key(p) for p in accepted["prompt"]]
    # a batch ingested before the index: its key file is built from its rows, the same
    (tmp_path / "b2").mkdir()
    (tmp_path / "b1" / "accepted.parquet").replace(tmp_path / "b2" / "accepted.parquet")
    assert pd.read_parquet(ensure_keys(tmp_path / "b2")).equals(keys)

    second = _write(tmp_path / "second.jsonl", [json.dumps(conv(f"Q{i}", "a", "b")) for i in range(4, 9)])
    index = KeyIndex([tmp_path / "b2" / KEYS_FILE])
    s2 = validate_file_to_parquet(second, tmp_path / "a2.parquet", tmp_path / "q2.parquet", known_index=index)
    assert s2["by_reason"] == {"duplicate_across_batches": 2} and s2["accepted"] == 3
    known = {record_key(r, "pairwise") for r in read_records(tmp_path / "b2" / "accepted.parquet").to_dict("records")}
    assert validate_file(second, known_keys=known).counts_by_reason() == s2["by_reason"]


def test_control_characters_found_on_the_bytes_equal_the_rule():
    import pyarrow.compute as pc

    from alignment_pipelines.data.validate.rules import CONTROL_CHARS

    rng = random.Random(3)
    edges = [chr(c) for c in (*range(0, 0x21), 0x7E, 0x7F, 0x80, 0x9F, 0xA0, 0xC2, 0xEF, 0xFFFC, 0xFFFD, 0xFFFE)]
    alphabet = edges + list("ab é日") + ["\u00c2\u0080", "\uefbf", "\U0001F600"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(5000)]
    arr = pa.array(texts)
    for values in (arr, arr.slice(11), pa.array(["", ""]), pa.array([], pa.string())):
        expected = pc.match_substring_regex(values, CONTROL_CHARS).to_numpy(zero_copy_only=False)
        assert columnar.control_char_rows(values).tolist() == expected.tolist()


def test_plain_lines_decode_every_json_escape_as_json_loads():
    """Every escape JSON has (quotes, backslash runs, solidus, controls, \\u of 1-, 2- and 3-byte characters and
    surrogate pairs), as Python writes them with and without ensure_ascii: the plain lines' records hold what
    json.loads reads, in line order; a line of another shape is left to the row converters."""
    from alignment_pipelines.data.ingest.plain_lines import PlainLines

    rng = random.Random(5)
    alphabet = ["a", " ", '"', "\\", "/", "\b", "\f", "\n", "\r", "\t", "\x01", "\x7f", "\u0080", "\u07ff", "\u0800",
                "é", "’", "日", "\ufffd", "\uffff", "😀", "u", "\\u"]
    values = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(20000)]
    for ensure_ascii in (True, False):
        lines = [json.dumps({"prompt": v, "chosen": v + "!", "rejected": v + "?"} if i % 2 else conv(v, v + "!", v + "?"),
                            ensure_ascii=ensure_ascii) for i, v in enumerate(values)]
        lines = [line.replace("/", "\\/") if i % 3 == 0 else line for i, line in enumerate(lines)]
        lines[5] = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "extra": 1})
        plain = PlainLines()
        plain.read(list(range(len(lines))), [line.encode() for line in lines])
        assert plain.index == [i for i in range(len(lines)) if i != 5]
        assert plain.flat == [i for i in plain.index if i % 2]
        columns = plain.columns()
        expected = [json.loads(lines[i]) for i in plain.index]
        assert columns["chosen"].to_pylist() == [e["chosen"] if isinstance(e["chosen"], str) else e["chosen"][0]["content"]
                                                 for e in expected]
        assert columns["prompt"].to_pylist() == [[{"role": "user", "content": e["prompt"]}] if isinstance(e["prompt"], str)
                                                 else e["prompt"] for e in expected]


def test_nfc_found_on_the_bytes_equals_pythons():
    """Every BMP character alone, after a letter, after a Hangul initial and before a combining mark, and random
    mixes: `columnar.normalize` (NFC asked only of values with a character that may change) equals Python's."""
    import unicodedata

    chars = [chr(c) for c in range(0x80, 0x10000) if not 0xD800 <= c < 0xE000]
    texts = chars + ["e" + c for c in chars] + ["\u1100" + c for c in chars] + [c + "\u0301" for c in chars[::7]]
    rng = random.Random(4)
    alphabet = ["a", " ", "e", "\u0301", "\u0327", "\u1100", "\u1161", "\u11a8", "\u2019", "\u2126", "\u00c5", "A",
                "\u030a", "\U0001d15e", "\U0001f600", "\u0958", "\uac00", "\u0344"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(20000)]
    expected = [unicodedata.normalize("NFC", t).strip() for t in texts]
    assert columnar.normalize(pa.array(texts)).to_pylist() == expected
    assert columnar.normalize(pa.array(texts).slice(5)).to_pylist() == expected[5:]


def test_piecewise_token_counts_equal_whole_text_counts(tmp_path):
    from alignment_pipelines.models.tiny import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(tmp_path / "tok")
    counter = TokenCounter(tmp_path / "tok")
    assert counter.piecewise
    rng = random.Random(1)
    alphabet = list("abcdefgh ABC  \n\t.,'!?0123456789éü日本\u00a0\u3000-_\"") + ["'s", "'ll", " 's", "<|im_end|>", "\r\n"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    assert counter.count(pa.array(texts)).tolist() == counter.encode_counts(texts).tolist()
    assert counter.count(pa.array(texts).slice(17)).tolist() == counter.encode_counts(texts[17:]).tolist()


def test_piecewise_counts_with_the_default_models_tokenizer(smollm2_tokenizer):
    counter = TokenCounter(smollm2_tokenizer)
    assert counter.piecewise
    rng = random.Random(2)
    alphabet = list("abcdefgh ABC  \n\t.,'!?0123456789éü日本\u00a0\u3000-_\"") + ["'s", " 's", "<|im_end|>", " <|im_start|>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(4000)]
    assert counter.count(pa.array(texts)).tolist() == counter.encode_counts(texts).tolist()


def test_streamed_gate_equals_the_in_memory_gate(tmp_path):
    lines = [json.dumps(conv(f"Q{i}", f"a{i}", f"b{i}")) for i in range(50)]
    path = _write(tmp_path / "g.jsonl", lines)
    validate_file_to_parquet(path, tmp_path / "a.parquet", tmp_path / "q.parquet", keys_path=tmp_path / "k.parquet")
    accepted = read_records(tmp_path / "a.parquet")
    whole = run_expectation_suite(accepted, quarantined_count=3)
    streamed = run_expectation_suite_on_file(tmp_path / "a.parquet", quarantined_count=3,
                                             keys_path=tmp_path / "k.parquet", chunk_rows=7)
    assert streamed.success and whole.success
    assert [(r["expectation"], r["column"], r["unexpected_count"]) for r in streamed.results] == \
        [(r["expectation"], r["column"], r["unexpected_count"]) for r in whole.results]
    # a duplicate across chunks is seen by the streamed gate too
    doubled = pd.concat([accepted, accepted.iloc[:1].assign(row=999)], ignore_index=True)
    from alignment_pipelines.data.records import write_records

    write_records(doubled, tmp_path / "d.parquet")
    report = run_expectation_suite_on_file(tmp_path / "d.parquet", chunk_rows=7)
    assert not report.success and [r["reason"] for r in report.failed] == ["duplicate"]


def _batch(tmp_path: Path, name: str, lines: list[str]) -> BatchFiles:
    directory = tmp_path / "batches" / name
    s = validate_file_to_parquet(_write(tmp_path / f"{name}.jsonl", lines), directory / "accepted.parquet",
                                 directory / "quarantine.parquet", keys_path=directory / KEYS_FILE)
    return BatchFiles(name, s["kind"], directory)


def test_sql_datasets_equal_the_pandas_reference(tmp_path):
    pairs1 = [json.dumps(conv(f"Question {i % 30}?", f"Good {i % 9}.", f"Bad {i}.")) for i in range(80)]
    pairs2 = [json.dumps(conv(f"Question {i % 30}?", f"Good {i % 9}.", f"Bad {i}.")) for i in range(60, 120)]
    binary = [json.dumps({"prompt": f"Question {i}?", "completion": f"Good {i % 9}.", "label": i % 3 == 0})
              for i in range(40)]
    prompts = [json.dumps({"prompt": f"Question {i}?"}) for i in range(25, 45)]
    batches = [_batch(tmp_path, "p1", pairs1), _batch(tmp_path, "b1", binary), _batch(tmp_path, "p2", pairs2),
               _batch(tmp_path, "q1", prompts)]
    frames = {b.key: read_records(b.accepted) for b in batches}
    pair_rows = pd.concat([frames["p1"], frames["p2"]], ignore_index=True)
    references = {
        "pairwise": pair_rows,
        "binary": pd.concat([frames["b1"], binary_from_pairs(pair_rows)], ignore_index=True),
        "prompts": pd.concat([frames["q1"], prompts_from(pair_rows, frames["b1"])], ignore_index=True),
    }
    for dataset, rows in references.items():
        for eval_fraction, seed in ((0.1, 0), (0.3, 5)):
            build = build_dataset(dataset, dataset, batches, tmp_path / "datasets" / dataset,
                                  eval_fraction=eval_fraction, seed=seed, memory_limit="500MB", threads=1)
            unique = deduplicate(rows, dataset)
            train, evaluation = split_by_prompt(unique, eval_fraction=eval_fraction, seed=seed)
            got_train, got_eval = read_records(build.train_path), read_records(build.eval_path)
            assert build.rows == len(unique)
            if dataset != "prompts":  # prompts: every source row counts as input (no pre-deduplicated part)
                assert build.input_rows == len(rows)
            for got, want in ((got_train, train), (got_eval, evaluation)):
                assert got["row"].tolist() == want["row"].tolist(), dataset
                assert got["prompt"].tolist() == [list(map(dict, p)) for p in want["prompt"]], dataset
                for col in [c for c in got.columns if c not in ("row", "prompt")]:
                    assert got[col].tolist() == want[col].tolist(), (dataset, col)
            if dataset == "binary":
                assert build.balance == kto_balance(unique)
            again = build_dataset(dataset, dataset, batches, tmp_path / "datasets" / dataset,
                                  eval_fraction=eval_fraction, seed=seed)
            assert again.version == build.version and not again.rewritten and again.train_rows == len(train)
    # a new batch changes the version; the same content from another file does not
    before = build_dataset("pairwise", "pairwise", batches, tmp_path / "datasets" / "pairwise").version
    copy = _batch(tmp_path, "p1copy", pairs1)
    assert build_dataset("pairwise", "pairwise", batches + [copy], tmp_path / "datasets" / "pairwise").version == before
    more = _batch(tmp_path, "p3", [json.dumps(conv("New?", "n", "m"))])
    assert build_dataset("pairwise", "pairwise", batches + [more], tmp_path / "datasets" / "pairwise").version != before
