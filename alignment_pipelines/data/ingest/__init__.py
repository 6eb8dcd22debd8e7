"""Stage 1: feedback files into records (formats, layouts, chunks, the JSON Lines fast path, the inbox)."""
