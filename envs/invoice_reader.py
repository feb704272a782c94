"""Reading a rendered invoice or receipt back into fields, as the ``invoice_extraction`` oracle does.

Lines are matched to fields by their labels (every label the env writes, compared with OCR look-alikes folded:
``T0TAL`` = ``Total``); the first unlabelled line is the vendor. Amounts and dates are parsed with the
rewards' own normalizers (:func:`rltk_rewards.invoice.parse_amount`, :func:`~rltk_rewards.invoice.parse_date`)
after undoing look-alikes inside numbers (``2O24`` → ``2024``).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from rltk_envs import data
from rltk_rewards.invoice import parse_amount, parse_date

_CANON = str.maketrans("015i", "olsl")


def _data() -> dict[str, Any]:
    return data("invoice_extraction")


def _canon(text: str) -> str:
    """Letters only, lower case, OCR look-alikes folded (0→o, 1/i→l, 5→s): what label matching compares."""
    return re.sub(r"[^a-z]", "", text.lower().translate(_CANON))


@cache
def _labels() -> list[tuple[str, str]]:
    """(canonical label, field) pairs, longest first; ``_skip`` marks distractor lines and titles."""
    data = _data()
    pairs = [(_canon(lab), key) for key, labs in data["labels"].items() for lab in labs]
    pairs += [(_canon(lab), "invoice_number") for lab in [*data["receipt_number_labels"], "Invoice"]]
    pairs += [(_canon(t), "_skip") for titles in data["titles"].values() for t in titles]
    return sorted(pairs, key=lambda p: -len(p[0]))


def _match(line: str) -> tuple[str | None, str]:
    """(field, text after the label) for the longest label that starts ``line`` and ends a word."""
    canon = _canon(line)
    for label, key in _labels():
        if not canon.startswith(label):
            continue
        seen = 0
        for i, ch in enumerate(line):
            seen += len(_canon(ch))
            if seen == len(label):
                if not line[i + 1 : i + 2].isalpha():
                    return key, line[i + 1 :]
                break
    return None, ""


def _numeric(text: str) -> str:
    """Undo look-alikes inside number tokens (``2O24`` → ``2024``, ``l5`` → ``15``); words stay."""
    fix = str.maketrans("OolI", "0011")
    return re.sub(
        r"[\dOolI]+", lambda m: m.group().translate(fix) if re.search(r"\d", m.group()) else m.group(), text
    )


def read_document(doc: str) -> dict[str, Any]:
    """Parse a rendered document: label-matched lines, and the first unlabelled line as the vendor."""
    currencies = _data()["currencies"]
    symbols = sorted(
        ((c["symbol"], k) for k, c in currencies.items() if c["symbol"]), key=lambda s: -len(s[0])
    )
    found: dict[str, Any] = {}
    for line in doc.splitlines():
        key, rest = _match(line)
        value = rest.strip(" :|~#.'\t")
        if key is None:
            found.setdefault("vendor", line.strip(" *|~'"))
        if key is None or not value or key in found or key in ("_skip", "customer", "subtotal"):
            continue
        if key in ("vendor", "invoice_number"):
            found[key] = value if key == "vendor" else value.split()[0]
        elif key in ("date", "due_date"):
            found[key] = parse_date(_numeric(value), search=True)
        else:  # total, tax, currency: the currency is the first code or symbol on these lines
            code = next((c for c in currencies if re.search(rf"\b{c}\b", value)), None)
            if code := code or next((k for s, k in symbols if s in value), None):
                found.setdefault("currency", code)
            if key != "currency":
                digits = re.sub(r"\b[A-Z]{3}\b", "", value.split("%")[-1])
                for symbol, _ in symbols:
                    digits = digits.replace(symbol, "")
                found[key] = parse_amount(
                    re.sub(r"[^\d.,]", "", digits.translate(str.maketrans("OoIl", "0011")))
                )
    return found
