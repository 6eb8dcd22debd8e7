"""Feedback data, importable without Dagster, as the stages a batch goes through, in order:

1. `ingest`: feedback files into records. `formats` (JSONL, JSON, CSV/TSV, Parquet, gzipped; the caps on
   what a file may cost), `layouts` (the row layouts and their conversion), `chunks` (a file in chunks, the
   file's layout, `Chunk`: records as Arrow), `jsonl_fast` and `plain_lines` (JSON Lines at Arrow speed),
   `inbox` (the inbox scan).
2. `validate`: every row accepted or quarantined with a reason. `rules` (the rules as data), `router` (the
   rules over Arrow columns, duplicates), `tokens` (token lengths), `pii` (personal-data screening), `engine`
   (the streaming engine every caller uses: `validate_file_to_parquet`, `validate_file`), `parallel` (worker processes for large files), `gate` (the batch gate: the same rules as a
   Great Expectations suite).
3. `datasets`: the training datasets built from accepted batches. `key_index` (row keys of every batch),
   `sql` (datasets built with SQL over the batches' Parquet files), `splits` (content keys, dataset
   versions, dedup, prompt-level splits, derived datasets).

Shared by the stages: `schemas` (record columns per kind, reason codes, the prompt helpers), `records`
(Parquet I/O of records and quarantine rows), `columnar` (Arrow kernels over records). `demo`: the demo
feedback. A module imports only from its own stage, an earlier one or the shared modules (no circles).

Importing a package imports none of its modules: pandas, pyarrow and Great Expectations load when used.
"""
