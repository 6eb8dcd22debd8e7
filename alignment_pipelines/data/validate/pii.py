"""PII screening: e-mail addresses, phone numbers and (Luhn-checked) card numbers.

`find_pii(text)` counts matches by type; `redact_pii(text)` replaces them with [EMAIL],
[PHONE] and [CARD]. Cards are matched first (so a card number is never counted as a phone),
then e-mail addresses, then phone numbers. The patterns favour precision: a phone number needs
9-15 digits with separators or a leading "+" (a bare run of digits is not one); a card number
13-19 digits that pass the Luhn check.
"""

from __future__ import annotations

import re
from collections import Counter

import pandas as pd

from alignment_pipelines.data.columnar import COMPLETION_FIELDS
from alignment_pipelines.data.schemas import as_messages

PII_TYPES = ("email", "phone", "card")
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]"}

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}(?![\w-])")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}[ .-]\d{2,4}(?:[ .-]?\d{2,5})?"
    r"(?![\w])(?![ .-]\d)"
)
_QUICK = re.compile(r"@|\d")


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = ord(ch) - 48
        if i % 2 == parity:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _card_ok(match: re.Match) -> bool:
    digits = _digits(match.group(0))
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _phone_ok(match: re.Match) -> bool:
    text = match.group(0)
    n = len(_digits(text))
    return 9 <= n <= 15 and (text.startswith("+") or "(" in text or sum(text.count(s) for s in " .-") >= 2)


def _scan(text: str, redact: bool) -> tuple[str, Counter]:
    counts: Counter = Counter()
    if not text or not _QUICK.search(text):
        return text, counts

    def sub(pattern: re.Pattern, kind: str, check, value: str) -> str:
        def repl(m: re.Match) -> str:
            if check is not None and not check(m):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(repl, value)

    # matches are replaced even when only counting, so that one span is never counted twice
    out = sub(CARD, "card", _card_ok, text)
    out = sub(EMAIL, "email", None, out)
    out = sub(PHONE, "phone", _phone_ok, out)
    return (out if redact else text), counts


def find_pii(text: str) -> Counter:
    """{"email": n, "phone": n, "card": n} (only types found)."""
    return _scan(text, redact=False)[1]


def redact_pii(text: str) -> tuple[str, Counter]:
    """(text with PII replaced by placeholders, counts by type)."""
    return _scan(text, redact=True)


def scan_records(records: pd.DataFrame, kind: str, redact: bool) -> tuple[pd.DataFrame, dict[int, Counter], Counter]:
    """(records, possibly redacted; {row: counts by type} of rows with PII; counts by type)."""
    counts: Counter = Counter()
    rows: dict[int, Counter] = {}
    scan = redact_pii if redact else (lambda text: (text, find_pii(text)))
    fields = COMPLETION_FIELDS[kind]
    new_prompts, new_fields = [], {f: [] for f in fields}
    for i, rec in enumerate(records.to_dict("records")):
        found: Counter = Counter()
        prompt = []
        for m in as_messages(rec["prompt"]):
            text, c = scan(m["content"])
            found += c
            prompt.append({"role": m["role"], "content": text})
        new_prompts.append(prompt)
        for f in fields:
            value = rec[f]
            if isinstance(value, str):
                value, c = scan(value)
                found += c
            new_fields[f].append(value)
        if found:
            rows[int(rec["row"])] = found
            counts += found
    if redact and rows:
        records = records.copy()
        records["prompt"] = pd.Series(new_prompts, index=records.index, dtype=object)
        for f in fields:
            records[f] = pd.Series(new_fields[f], index=records.index, dtype=object)
    return records, rows, counts

