"""Stage 3: training datasets from accepted batches (key index, SQL builds, splits)."""
