"""The engine's JSON Lines parser (msgspec, typed decoding: `data/ingest/plain_lines.py`) beside orjson and
pyarrow's JSON reader, each inside the same engine (the same rules, routing and outputs), end to end.

    python benchmarks/parsers.py [--rows 250000] [--repeat 3] [--output benchmarks/results/parsers.md]

What each parser does in the engine (`validate_file_to_parquet`, one process: `workers=1`, so that every parser
runs alike; the next chunk is still read on a second thread): it turns a chunk's lines into the records of
the lines of the two plain shapes, and hands every other line to the row converters, as before.
- msgspec: the engine as it is (typed decoding into Structs, `forbid_unknown_fields`, roles as a Literal);
- orjson: `orjson.loads` of each line, the shape checked on the objects;
- pyarrow: `pyarrow.json.read_json` over runs of lines with the conversational schema (unexpected fields an
  error); a run that fails (a broken line, another shape) is halved until the failing lines are found, and
  those go to the row converters.
A line a library cannot parse goes through Python's `json` (the reasons must name the same error), as does
the first line (it may carry a BOM). Each run asserts the same outcome: rows, accepted, quarantined, the
counts by reason, and digests of the accepted rows' keys and of the quarantined rows (row, reason, detail).
The hand-written parser msgspec replaced was measured by this script at commit 5caebe9
(benchmarks/results/parsers.md).

Texts: `generated` (random words in HH-like 3-turn prompts) and `hh` (the real Anthropic HH pairs of
../shared/data, read from there), both as `benchmarks/ingestion.py` writes them: conversational pairs with
~1% bad rows. Each (text, parser) runs `--repeat` times in a fresh process, parsers interleaved; the table
shows the median and every run, with the machine's load (`uptime`) before each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PARSERS = ("msgspec", "orjson", "pyarrow")  # msgspec: the engine's own
ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- the libraries inside the engine


def _message(m) -> tuple[str, str] | None:
    if type(m) is dict and len(m) == 2 and m.get("role") in ROLES and type(m.get("content")) is str:
        return m["role"], m["content"]
    return None


def _answer(value) -> str | None:
    if type(value) is list and len(value) == 1:
        m = _message(value[0])
        if m is not None and m[0] == "assistant":
            return m[1]
    return None


def _add_object(plain, i: int, obj) -> bool:
    """Add a parsed object of one of the plain shapes (what the shape patterns accept); False for any other."""
    if type(obj) is not dict or len(obj) != 3:
        return False
    prompt, chosen, rejected = obj.get("prompt"), obj.get("chosen"), obj.get("rejected")
    if type(prompt) is str and type(chosen) is str and type(rejected) is str:
        plain.add(i, [("user", prompt)], chosen, rejected, flat=True)
        return True
    if type(prompt) is not list or not prompt:
        return False
    turns = [_message(m) for m in prompt]
    chosen, rejected = _answer(chosen), _answer(rejected)
    if None in turns or chosen is None or rejected is None or turns[-1][0] != "user":
        return False
    plain.add(i, turns, chosen, rejected, flat=False)
    return True


def _plain_ok(lines):
    """Lines a parser may read: not the first line (a BOM), valid UTF-8, under the line cap."""
    import numpy as np

    ok = lines.rows != 1
    for odd in (lines.bad_utf8, lines.too_long):
        if odd:
            ok &= ~np.isin(lines.rows, np.fromiter(odd, dtype=np.int64))
    return ok


def _importer_row(jf, lines, i: int, text: str):
    row = int(lines.rows[i])
    long_line = lines.too_long.get(row)
    return long_line.row(row) if long_line else jf._raw_row(row, text, lines.bad_utf8.get(row))


def _prepared(jf, lines, plain, other: list, other_index: list[int]):
    import numpy as np

    return jf._Prepared(lines, np.asarray(plain.conversational, np.int64), np.asarray(plain.flat, np.int64),
                        other, np.asarray(other_index, dtype=np.int64), columns=plain.columns() if plain.index else {})


def _per_line(decode):
    """A `_prepare` for a parser of one line at a time: `decode(text) -> (True, columns added) | (False, object)`,
    raising ValueError where the line is not JSON it reads."""
    def prepare(lines):
        from alignment_pipelines.data.ingest import jsonl_fast as jf
        from alignment_pipelines.data.ingest.plain_lines import PlainLines

        ok = _plain_ok(lines)
        plain, other, other_index = PlainLines(), [], []
        for i, text in enumerate(lines.text.to_pylist()):
            if ok[i]:
                try:
                    added, obj = decode(plain, i, text)
                except ValueError:  # the importer's json names the error
                    added, obj = False, None
                if added:
                    continue
                if obj is not None:
                    other.append((int(lines.rows[i]), obj, jf._shown(text)))
                    other_index.append(i)
                    continue
            other.append(_importer_row(jf, lines, i, text))
            other_index.append(i)
        return _prepared(jf, lines, plain, other, other_index)
    return prepare


def _orjson_decode():
    import orjson

    def decode(plain, i, text):
        obj = orjson.loads(text)
        return _add_object(plain, i, obj), obj
    return decode


def _pyarrow_prepare(lines):
    """Runs of readable lines through `pyarrow.json.read_json` (conversational schema), halved where they fail."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    from alignment_pipelines.data import columnar
    from alignment_pipelines.data.ingest import jsonl_fast as jf

    message_list = pa.list_(columnar.MESSAGE_TYPE)
    options = pj.ParseOptions(explicit_schema=pa.schema([("prompt", message_list), ("chosen", message_list),
                                                         ("rejected", message_list)]),
                              unexpected_field_behavior="error")
    text = lines.text
    offsets = columnar.string_offsets(text)
    data = text.buffers()[2]
    read_ok = _plain_ok(lines)
    parsed: list[tuple[int, pa.Table]] = []
    failed = np.zeros(len(lines), dtype=bool)

    def read(start: int, stop: int) -> None:
        block = data[int(offsets[start]): int(offsets[stop])]
        try:
            table = pj.read_json(pa.BufferReader(block), parse_options=options,
                                 read_options=pj.ReadOptions(block_size=max(1 << 20, block.size + 1)))
            if table.num_rows != stop - start:
                raise pa.ArrowInvalid("a line was skipped")
            parsed.append((start, table))
        except pa.ArrowInvalid:
            if stop - start <= 64:
                failed[start:stop] = True
            else:
                middle = (start + stop) // 2
                read(start, middle)
                read(middle, stop)

    edges = np.flatnonzero(np.diff(np.concatenate([[0], read_ok.astype(np.int8), [0]])))
    for start, stop in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        read(start, stop)
    plain_mask = np.zeros(len(lines), dtype=bool)
    tables, indices = [], []
    for start, table in sorted(parsed, key=lambda p: p[0]):
        prompt = columnar.as_array(table.column("prompt"))
        chosen, rejected = (columnar.as_array(table.column(c)) for c in ("chosen", "rejected"))
        good = (pc.is_valid(prompt).to_numpy(zero_copy_only=False) & pc.is_valid(chosen).to_numpy(zero_copy_only=False)
                & pc.is_valid(rejected).to_numpy(zero_copy_only=False))
        good &= pc.fill_null(pc.list_value_length(prompt), 0).to_numpy(zero_copy_only=False) > 0
        for answers in (chosen, rejected):
            good &= pc.fill_null(pc.list_value_length(answers), 0).to_numpy(zero_copy_only=False) == 1
        roles, contents, parents = columnar.prompt_parts(prompt)
        bad_turn = ~(pc.is_in(roles, pa.array(ROLES)).to_numpy(zero_copy_only=False)
                     & pc.is_valid(contents).to_numpy(zero_copy_only=False))
        good[parents[bad_turn]] = False
        ends = np.asarray(prompt.offsets.to_numpy(), dtype=np.int64) - int(prompt.offsets[0].as_py())
        last = np.maximum(ends[1:] - 1, 0)
        if len(roles):
            good &= pc.fill_null(pc.equal(roles.take(pa.array(last)), "user"), False).to_numpy(zero_copy_only=False)
        answer_text = {}
        for name, answers in (("chosen", chosen), ("rejected", rejected)):
            flat = pc.list_element(answers.fill_null(pa.scalar([{"role": "", "content": ""}], answers.type)), 0)
            good &= pc.fill_null(pc.equal(flat.field("role"), "assistant"), False).to_numpy(zero_copy_only=False)
            good &= pc.is_valid(flat.field("content")).to_numpy(zero_copy_only=False)
            answer_text[name] = flat.field("content")
        keep = np.flatnonzero(good)
        plain_mask[start + keep] = True
        indices.append(start + keep)
        tables.append({"prompt": prompt.take(pa.array(keep)).cast(columnar.PROMPT_TYPE),
                       **{name: answer_text[name].take(pa.array(keep)) for name in answer_text}})
    other_index = np.flatnonzero(~plain_mask)
    texts = columnar.subset(text, other_index).to_pylist() if len(other_index) else []
    other = [_importer_row(jf, lines, i, t) for i, t in zip(other_index.tolist(), texts)]
    index = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    columns = {k: pa.concat_arrays([t[k] for t in tables]) for k in ("prompt", "chosen", "rejected")} if tables else {}
    return jf._Prepared(lines, index, np.zeros(0, np.int64), other, other_index, columns=columns)


def install(parser: str) -> None:
    """Put another library in the place of the engine's msgspec in this process (the engine calls `_prepare` for
    each chunk's lines: `_Prepared.columns` holds the records of its plain lines)."""
    from alignment_pipelines.data.ingest import jsonl_fast

    if parser == "msgspec":
        return
    prepare = _per_line(_orjson_decode()) if parser == "orjson" else _pyarrow_prepare
    jsonl_fast._prepare = prepare


# --------------------------------------------------------------------------- runs


def _digest(table, columns: list[str]) -> str:
    h = hashlib.sha256()
    for column in columns:
        h.update(json.dumps(table.column(column).to_pylist(), default=str).encode())
    return h.hexdigest()[:16]


def child(parser: str, path: str) -> None:
    """In a fresh process: validate one file with one parser, print a JSON line."""
    import pyarrow.parquet as pq

    from alignment_pipelines.data.validate.engine import validate_file_to_parquet

    install(parser)
    out = Path(path).parent / parser
    out.mkdir(exist_ok=True)
    tiny = out / "warmup.jsonl"  # imports and first calls are one-off costs, not throughput
    tiny.write_text("\n".join(json.dumps({"prompt": [{"role": "user", "content": f"q{i}"}],
                                          "chosen": [{"role": "assistant", "content": "a"}],
                                          "rejected": [{"role": "assistant", "content": "b"}]}) for i in range(3)) + "\n")
    validate_file_to_parquet(tiny, out / "w.a.parquet", out / "w.q.parquet", workers=1)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    summary = validate_file_to_parquet(path, out / "accepted.parquet", out / "quarantine.parquet",
                                       keys_path=out / "keys.parquet", workers=1)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime  # both threads
    outcome = {k: summary[k] for k in ("rows", "accepted", "quarantined", "by_reason")}
    outcome["accepted_keys"] = _digest(pq.read_table(out / "keys.parquet"), ["row", "key"])
    outcome["quarantine"] = _digest(pq.read_table(out / "quarantine.parquet"), ["row", "reason", "detail"])
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "outcome": outcome}))


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=250_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--text", action="append", choices=("generated", "hh"), help="default: both")
    ap.add_argument("--output", type=Path, help="write the markdown table here")
    ap.add_argument("--child", nargs=2, metavar=("PARSER", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from ingestion import generate_large, generated_record, hh_records

    texts = args.text or ["generated", "hh"]
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="parsers-") as tmp:
        for text in texts:
            path = Path(tmp) / text / "batch.jsonl"
            path.parent.mkdir()
            generate_large(path, args.rows, record=generated_record if text == "generated" else hh_records())
            size = path.stat().st_size
            for run in range(args.repeat):
                for parser in PARSERS:
                    before = load()
                    done = subprocess.run([sys.executable, __file__, "--child", parser, str(path)], capture_output=True,
                                          text=True, check=True)
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    result.update(load=before, bytes=size)
                    results.setdefault((text, parser), []).append(result)
                    print(f"{text} {parser} run {run + 1}: {result['seconds']:.2f} s, {result['cpu_seconds']:.2f} CPU s "
                          f"(load {before})", flush=True)
            outcomes = {json.dumps(r["outcome"], sort_keys=True) for p in PARSERS for r in results[(text, p)]}
            assert len(outcomes) == 1, f"{text}: the parsers disagree: {outcomes}"
    table = report(results, texts, args)
    print(table)
    if args.output:
        args.output.write_text(table)


def report(results: dict, texts: list[str], args) -> str:
    lines = [
        "# JSON Lines parsers inside the engine",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, 2 cores shared with other work "
        f"(training runs and benchmarks of other engineers: see the load). Command: `python benchmarks/parsers.py "
        f"--rows {args.rows} --repeat {args.repeat}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).",
        "",
        "Each figure: `validate_file_to_parquet` end to end (read, parse, rules, duplicates, Parquet and key "
        "outputs) in one process (`workers=1`), the median of the runs, wall-clock seconds and CPU seconds (both "
        "threads); every run beside it, with the load (`uptime`, 1/5/15-minute averages) before it. Every run of "
        "every parser gave the same outcome (rows, accepted, quarantined, reasons, digests of the accepted keys and "
        "the quarantined rows).",
        "",
        "| text | rows | MB | parser | median s | rows/s | median CPU s | runs: s (CPU s) | load before each run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for text in texts:
        medians = {p: statistics.median(r["seconds"] for r in results[(text, p)]) for p in PARSERS}
        cpu = {p: statistics.median(r["cpu_seconds"] for r in results[(text, p)]) for p in PARSERS}
        outcome = results[(text, PARSERS[0])][0]["outcome"]
        for parser in PARSERS:
            runs = results[(text, parser)]
            each = ", ".join(f"{r['seconds']:.2f} ({r['cpu_seconds']:.2f})" for r in runs)
            lines.append(f"| {text} | {outcome['rows']:,} | {runs[0]['bytes'] / 1e6:.0f} | {parser} | "
                         f"{medians[parser]:.2f} | {outcome['rows'] / medians[parser]:,.0f} | {cpu[parser]:.2f} | "
                         f"{each} | {'; '.join(r['load'] for r in runs)} |")
        best, best_cpu = min(PARSERS, key=medians.get), min(PARSERS, key=cpu.get)
        verdicts.append((text, best, medians[best], best_cpu, cpu[best_cpu], outcome))
    lines += ["", "Outcome, the same for every parser:", ""]
    for text, *_, outcome in verdicts:
        lines.append(f"- {text}: {outcome['rows']:,} rows, {outcome['accepted']:,} accepted, quarantined by "
                     f"reason {json.dumps(outcome['by_reason'])}")
    lines += ["", "## Fastest", ""]
    for text, best, _, best_cpu, _, _ in verdicts:
        lines.append(f"- {text}: {best} by median wall-clock, {best_cpu} by median CPU seconds.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
