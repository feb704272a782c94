"""Rewards for the invoice-extraction workflow (``rltk_envs.invoice_extraction``).

What is rewarded: a reply that is one JSON object with exactly the task's schema keys and the right value
types (:func:`invoice_json_valid`), and the field-level F1 of its values against the gold fields
(:func:`invoice_field_f1`). Values are normalized before comparing: amounts (``"1,234.50"``, ``"€1.234,50"``,
numbers), dates (ISO, ``15 Mar 2024``, ``March 15, 2024``, ``15.03.2024``, ``2024/03/15`` → ISO), currency
symbols → ISO codes, and text (case, spacing, punctuation). The env's verdict (``check``) uses
:func:`score_reply` too: one parser for env and rewards.

Untrusted output: a reply that is not exactly one JSON object (optionally inside one ```json fence) scores 0
on both. So do two objects, prose around the object, a repeated key, a list or object as a value (a list of
candidate totals), whitespace runs of more than 16 characters (padding) and replies over 2,000 characters.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Hashable, Mapping
from typing import Any

from rltk_rewards.json_answer import json_object

from rltk.reward import reward_fn

MAX_CHARS = 2000
_PADDING = re.compile(r"\s{17,}")
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}")
_SYMBOLS = {
    "CA$": "CAD",
    "A$": "AUD",
    "US$": "USD",
    "$": "USD",
    "€": "EUR",
    "£": "GBP",
    "¥": "JPY",
    "₹": "INR",
}
_CODES = ("USD", "EUR", "GBP", "JPY", "INR", "CAD", "AUD", "CHF")
_MONTH_ABBR = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS = {m: i for i, m in enumerate(_MONTH_ABBR, 1)}
_DATES = (
    (re.compile(r"(?P<y>\d{4})[-/.](?P<m>\d{1,2})[-/.](?P<d>\d{1,2})"), None),
    (re.compile(r"(?P<d>\d{1,2})\.(?P<m>\d{1,2})\.(?P<y>\d{4})"), None),
    (re.compile(r"(?P<d>\d{1,2})(?:st|nd|rd|th)?[ -]+(?P<mon>[A-Za-z]{3,9})\.?[ ,-]+(?P<y>\d{4})"), None),
    (re.compile(r"(?P<mon>[A-Za-z]{3,9})\.?\s+(?P<d>\d{1,2})(?:st|nd|rd|th)?,?\s+(?P<y>\d{4})"), None),
    (re.compile(r"(?P<a>\d{1,2})/(?P<b>\d{1,2})/(?P<y>\d{4})"), "slash"),
)


def parse_reply(text: Any) -> dict[str, Any] | None:
    r"""The reply's one JSON object, or None (not a string, not exactly one object, padding, nested values).

    >>> parse_reply('```json\n{"total": 12.5}\n```')
    {'total': 12.5}
    >>> parse_reply('{"total": 1}{"total": 2}') is None  # two objects: a hedge
    True
    >>> parse_reply('{"total": [12.5, 13.0]}') is None  # candidate totals: a hedge
    True
    >>> parse_reply('{"total": 1, "total": 2}') is None  # a repeated key
    True
    """
    if not isinstance(text, str) or len(text) > MAX_CHARS or _PADDING.search(text):
        return None
    obj = json_object(text)
    if obj is None or any(isinstance(v, (list, dict)) for v in obj.values()):
        return None
    return obj


def parse_amount(value: Any) -> float | None:
    """A number, or a string amount with symbols, codes, thousands separators, decimal comma; else None.

    >>> [parse_amount(v) for v in ("$1,234.50", "1.234,50 €", "EUR 1 234,5", "¥12,345", 7, "12 or 13")]
    [1234.5, 1234.5, 1234.5, 12345.0, 7.0, None]
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    s = value.upper()
    for sym in (*_CODES, *_SYMBOLS):
        s = s.replace(sym, "")
    s = re.sub(r"\s+", "", s)
    if not re.fullmatch(r"-?[\d.,]*\d[\d.,]*", s):
        return None
    if "," in s and "." in s:
        dec = max(s.rfind(","), s.rfind("."))
        s = re.sub(r"[.,]", "", s[:dec]) + "." + s[dec + 1 :]
    elif s.count(",") == 1 and not re.search(r",\d{3}$", s):
        s = s.replace(",", ".")
    elif s.count(",") > 0 or s.count(".") > 1:
        s = re.sub(r"[.,]", "", s)
    try:
        return float(s)
    except ValueError:
        return None


def parse_date(value: Any, search: bool = False) -> str | None:
    """A date in one of several formats → ISO ``YYYY-MM-DD``; None if not a valid date.

    ``search`` finds the date inside a longer text instead of requiring the whole string to be one. Slash
    dates ``a/b/YYYY`` count only where the order is unambiguous (one part over 12, or both equal).

    >>> [parse_date(v) for v in ("2024-03-15", "15 Mar 2024", "March 15, 2024", "15.03.2024", "3/15/2024")]
    ['2024-03-15', '2024-03-15', '2024-03-15', '2024-03-15', '2024-03-15']
    >>> parse_date("03/04/2024") is None and parse_date("2024-02-30") is None
    True
    """
    if not isinstance(value, str):
        return None
    for pattern, kind in _DATES:
        m = pattern.search(value) if search else pattern.fullmatch(value.strip())
        if not m:
            continue
        g = m.groupdict()
        if kind == "slash":
            a, b = int(g["a"]), int(g["b"])
            if a <= 12 and b <= 12 and a != b:
                return None
            g["m"], g["d"] = (str(b), str(a)) if a > 12 else (str(a), str(b))
        month = int(g["m"]) if g.get("m") else _MONTHS.get(g.get("mon", "")[:3].lower())
        try:
            return dt.date(int(g["y"]), month or 0, int(g["d"])).isoformat()
        except (ValueError, TypeError):
            return None
    return None


def _norm_currency(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    s = value.strip()
    return _SYMBOLS.get(s, s.upper())


def _norm_text(value: Any) -> str | None:
    return re.sub(r"[\W_]+", "", value.casefold()) if isinstance(value, str) else None


def normalize(kind: str, value: Any) -> Hashable | None:
    """A field's value in the form answers are compared in; None when it cannot be right (best-of-N votes).

    >>> normalize("number", "$1,204.50"), normalize("currency", "€"), normalize("text", "ACME, Inc.")
    (1204.5, 'EUR', 'acmeinc')
    >>> normalize("currency", "dollars") is None
    True
    """
    if kind == "number":
        amount = parse_amount(value)
        return None if amount is None else round(amount, 2)
    if kind == "date":
        return parse_date(value)
    if kind == "currency":
        code = _norm_currency(value)
        return code if code and re.fullmatch(r"[A-Z]{3}", code) else None
    return _norm_text(value) or None


def _same(kind: str, got: Any, gold: Any) -> bool:
    if kind == "number":
        amount = parse_amount(got)
        return amount is not None and abs(amount - float(gold)) < 0.005
    if kind == "date":
        return parse_date(got) == gold
    if kind == "currency":
        return _norm_currency(got) == gold
    return _norm_text(got) == _norm_text(gold)


def _type_ok(kind: str, value: Any) -> bool:
    if value is None:
        return True
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not isinstance(value, str):
        return False
    if kind == "date":
        return bool(_ISO.fullmatch(value)) and parse_date(value) == value
    if kind == "currency":
        return bool(re.fullmatch(r"[A-Z]{3}", value))
    return bool(value.strip())


def score_reply(completion: Any, reference: Mapping[str, Any]) -> dict[str, Any]:
    """``{"valid": bool, "f1": float | None, "correct": bool}`` for one reply against its task's reference.

    ``reference`` is ``{"schema": {key: "string" | "date" | "currency" | "number"}, "answer": {key: gold}}``
    with ``None`` gold for a field the document does not show. F1 counts a non-null reply value as a true
    positive where it matches a filled gold field, else a false positive (a wrong value, a value for an absent
    field, an extra key); a filled gold field not matched is a false negative. Null and ``""`` are "no value".
    """
    schema, gold = reference["schema"], reference["answer"]
    filled = sum(v is not None for v in gold.values())
    obj = parse_reply(completion)
    if obj is None:
        return {"valid": False, "f1": 0.0 if filled else None, "correct": False}
    valid = set(obj) == set(schema) and all(_type_ok(schema[k], v) for k, v in obj.items())
    tp = fp = 0
    for key, value in obj.items():
        if value is None or value == "":
            continue
        if key in schema and gold.get(key) is not None and _same(schema[key], value, gold[key]):
            tp += 1
        else:
            fp += 1
    f1 = 2 * tp / (tp + fp + filled) if filled else None
    return {"valid": valid, "f1": f1, "correct": tp == filled and fp == 0}


@reward_fn(range=(0.0, 1.0))
def invoice_json_valid(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """1 if the reply is one JSON object with exactly the schema's keys and the right value types, else 0.

    Types: text fields a non-empty string, dates an ISO ``YYYY-MM-DD`` string, currency a 3-letter upper-case
    code, amounts a JSON number; ``null`` is allowed for every field. Right or wrong values alike.

    >>> ref = {"schema": {"vendor": "string", "total": "number"}, "answer": {"vendor": "Acme", "total": 5.0}}
    >>> invoice_json_valid('{"vendor": "Zed", "total": null}', ref, {})
    1.0
    >>> invoice_json_valid('{"vendor": "Acme", "total": "5.00"}', ref, {})  # an amount as a string
    0.0
    >>> invoice_json_valid('{"vendor": "Acme"}', ref, {})  # a key missing
    0.0
    """
    return 1.0 if score_reply(completion, reference)["valid"] else 0.0


@reward_fn(range=(0.0, 1.0))
def invoice_field_f1(
    completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]
) -> float | None:
    """Field-level F1 over the fields the gold answer fills, after normalizing values; 0 if unparseable.

    None only for a task whose gold fills no field (never generated).

    >>> ref = {"schema": {"vendor": "string", "total": "number", "tax": "number"},
    ...        "answer": {"vendor": "Acme Ltd", "total": 1234.5, "tax": None}}
    >>> invoice_field_f1('{"vendor": "ACME LTD.", "total": "$1,234.50", "tax": null}', ref, {})
    1.0
    >>> invoice_field_f1('{"vendor": "Acme Ltd", "total": 99, "tax": null}', ref, {})
    0.5
    >>> round(invoice_field_f1('{"vendor": "Acme Ltd", "total": 1234.5, "tax": 3.0}', ref, {}), 3)
    0.8
    >>> invoice_field_f1('{"vendor": "Acme Ltd", "total": [1234.5, 99]}', ref, {})
    0.0
    """
    return score_reply(completion, reference)["f1"]
