"""Chunks of a large JSON Lines file read, converted and assessed by worker processes, given back in file
order; and the next chunk read on a second thread (`prefetch`) where one process does the work."""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignment_pipelines.data.ingest.jsonl_fast import convert_range, iter_jsonl_chunks
from alignment_pipelines.data.validate.router import assess_chunk
from alignment_pipelines.data.validate.rules import ValidationRules
from alignment_pipelines.data.validate.tokens import load_token_counter


def _one_thread_each(tokenizer: str | None) -> None:
    """A worker's initializer: the workers already use every core, so Arrow and the tokenizer use one thread
    each (their thread pools would otherwise spin against the other workers); the tokenizer is loaded now,
    while the first chunk is read."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    pa.set_cpu_count(1)
    if tokenizer:
        load_token_counter(tokenizer)


def _assess_range(source: str, line_range, layout: str, rules: ValidationRules, handover: str):
    """In a worker process: one chunk read from its byte range, converted and assessed (`router.assess_chunk`).
    Its records go back as an Arrow file in `handover`, which the caller maps into memory (no copy), the
    rest pickled."""
    chunk = convert_range(source, line_range, layout)
    assessment = assess_chunk(chunk, rules)
    records = str(Path(handover) / f"{line_range.start}.arrow")
    with pa.ipc.new_file(records, chunk.table.schema) as writer:
        writer.write_table(chunk.table)
    chunk.table = None
    return chunk, assessment, records


@dataclass
class _Handed:
    """A chunk of a file assessed in parallel: the arguments of `jsonl_fast.convert_range`, its future in the
    pool, and (chunk, assessment) once this process has taken it back and assessed it itself."""

    args: tuple
    future: Any
    here: tuple | None = None


def assessed_in_workers(path: Path, layout: str | None, chunk_rows: int, rules: ValidationRules, workers: int):
    """`_iter_chunks` with each chunk read, converted and assessed by `workers` processes, given back in file
    order: the duplicates, which depend on every earlier row, are settled by the caller, one chunk after the
    other.

    `workers` - 1 processes take the chunks in turn, each handed one at a time by a thread of its own, so
    the chunks still waiting can be cancelled; whenever the chunk to settle next is not ready, this process
    takes back the first one waiting and assesses it itself. Neither side waits on the other, the last
    chunks are shared out, and one process fewer is started."""
    import tempfile
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    tokenizer = str(rules.tokenizer) if rules.tokenizer else None
    pool = ProcessPoolExecutor(workers - 1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_one_thread_each, initargs=(tokenizer,))
    for _ in range(workers - 1):  # start them now: they import and load the tokenizer while the layout is decided
        pool.submit(os.getpid)
    handing = ThreadPoolExecutor(workers - 1, thread_name_prefix="feedback-chunks")
    handover = tempfile.TemporaryDirectory(prefix="feedback-chunks-")
    window: deque[_Handed] = deque()

    def in_pool(args: tuple):
        return pool.submit(_assess_range, *args, rules, handover.name).result()

    def hand(*args) -> _Handed:
        return _Handed(args, handing.submit(in_pool, args))

    def take_back(head: _Handed) -> bool:
        """Assess here the first chunk not yet started, from `head` on (False when there is none)."""
        for item in (head, *window):
            if item.here is None and item.future.cancel():
                chunk = convert_range(*item.args)
                item.here = (chunk, assess_chunk(chunk, rules))
                return True
        return False

    def received(item: _Handed):
        while item.here is None and not item.future.done() and take_back(item):
            pass
        if item.here is not None:
            return item.here
        chunk, assessment, records = item.future.result()
        chunk.table = pa.ipc.open_file(pa.memory_map(records)).read_all()
        os.unlink(records)  # the mapping stays until the table is dropped
        return chunk, assessment

    try:
        for item in iter_jsonl_chunks(path, layout=layout, chunk_rows=chunk_rows, assess=hand):
            # a chunk converted here (no layout could be chosen: nothing but blank or broken lines) is routed as is
            window.append(item if isinstance(item, _Handed) else _Handed((), None, (item, None)))
            if len(window) > workers + 2:  # the chunks in the pool, and two or more to take back
                yield received(window.popleft())
        while window:
            yield received(window.popleft())
    finally:
        handing.shutdown(cancel_futures=True)
        pool.shutdown(cancel_futures=True)
        handover.cleanup()


def prefetch(chunks):
    """Read and parse the next chunk on a second thread while this one is routed (Arrow, RE2, the
    JSON reader and the tokenizer release the GIL, so the two cores overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    iterator = iter(chunks)
    sentinel = object()
    with ThreadPoolExecutor(1, thread_name_prefix="feedback-reader") as pool:
        future = pool.submit(next, iterator, sentinel)
        while True:
            chunk = future.result()
            if chunk is sentinel:
                return
            future = pool.submit(next, iterator, sentinel)
            yield chunk

