"""Stage 2: every row accepted or quarantined (rules, router, tokens, PII, the streaming engine, the gate)."""
