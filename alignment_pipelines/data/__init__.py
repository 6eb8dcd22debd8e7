"""Feedback data, importable without Dagster; import from the modules:

- `schemas`: record columns per kind, reason codes, the prompt helpers (`normalize_prompt`,
  `as_messages`, `render_prompt`, `last_user_turn`)
- `importers`: feedback files (JSONL, JSON, CSV/TSV, Parquet, gzipped) into records
- `validation`: the Great Expectations suite per kind: row routing and the batch gate
- `records`: Parquet I/O of records and quarantine rows
- `splits`: content keys, dataset versions, dedup, prompt-level splits, derived datasets
- `inbox`, `pii`, `demo`: the inbox scan, personal-data screening, the demo feedback

Importing this package imports none of them: pandas, pyarrow and Great Expectations load when used.
"""
