"""The answer checks of the ``dataset`` env: normalisation, parsers of references and of model output.

One module holds both sides of every check kind so that the env's verdict, its oracle's answers and the
trivial baselines all go through the same parser:

- ``exact``: the answer equals the reference after :func:`normalize_text` (NFKC, whitespace collapsed,
  surrounding quotes and one trailing period dropped, case folded unless ``case_sensitive``);
- ``choice``: the answer, normalised, is one of a label set, and the reference's label;
- ``numeric``: the answer is one number (``1,234.5``, ``$12``, ``40%``, ``3/4``, ``1e-3``) within
  ``max(tolerance, rel_tolerance * |reference|)`` of the reference;
- ``json_f1``: the answer is one JSON object (optionally in a ```json fence); field-level F1 against the
  reference object, correct at ``f1 >= f1_threshold``;
- ``regex``: the answer (stripped) fully matches the row's reference pattern;
- ``reward``: a registered reward scores the answer; correct at ``score >= reward_threshold``.

Model output is untrusted: every parser here returns None (never raises) on anything it cannot read, and
answers past :data:`MAX_ANSWER_CHARS` are not read at all (a hedge or padding, and a cap on regex time).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Hashable, Mapping
from fractions import Fraction
from typing import Any

from rltk_rewards.json_answer import json_object

from rltk.reward import reward_fn
from rltk.reward_contract import call_one

CHECKS = ("exact", "choice", "numeric", "json_f1", "regex", "reward")
MAX_ANSWER_CHARS = 4000
_SPACES = re.compile(r"\s+")
_QUOTES = (('"', '"'), ("'", "'"), ("`", "`"), ("\u201c", "\u201d"), ("\u2018", "\u2019"))
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_CURRENCY = "$€£¥₹"


def as_text(value: Any) -> str | None:
    """A cell as text: None (and NaN) stay None; integral floats lose their ``.0`` (3.0 → ``"3"``).

    Integral floats are written as integers because JSON and Parquet loaders widen an integer column to
    floats as soon as one row holds a fraction: appending such a row must not change how other rows read.

    >>> as_text(3.0), as_text(2.5), as_text(True), as_text({"b": 1, "a": None}), as_text(float("nan"))
    ('3', '2.5', 'true', '{"a": null, "b": 1}', None)
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return str(value)


def normalize_text(text: str, case_sensitive: bool = False) -> str:
    r"""Text as the ``exact`` and ``choice`` checks compare it.

    >>> normalize_text('  "Billing."  '), normalize_text("New\n  York"), normalize_text("ＡＢ", True)
    ('billing', 'new york', 'AB')
    """
    text = _SPACES.sub(" ", unicodedata.normalize("NFKC", text)).strip()
    for left, right in _QUOTES:
        if len(text) >= 2 and text.startswith(left) and text.endswith(right):
            text = text[1:-1].strip()
            break
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip()
    return text if case_sensitive else text.casefold()


def format_number(x: float) -> str:
    """The canonical text of a number: integral values without a fraction.

    >>> format_number(12.0), format_number(0.5), format_number(-3)
    ('12', '0.5', '-3')
    """
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


def parse_number(text: Any) -> float | None:
    """One number written as a person would, or None.

    >>> [parse_number(s) for s in ("1,234.5", "$12", "40%", "3/4", "-1e-3", "12.", "3 or 4", "nan")]
    [1234.5, 12.0, 40.0, 0.75, -0.001, 12.0, None, None]
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        return None
    if not isinstance(text, str):
        return float(text) if math.isfinite(text) else None
    t = unicodedata.normalize("NFKC", text).strip()
    if len(t) > 64:
        return None
    t = t.rstrip(".").rstrip("%").strip() if not t.endswith("..") else t
    sign = t[:1] if t[:1] in "+-" else ""
    t = t[len(sign) :].lstrip(_CURRENCY).strip()
    if _THOUSANDS.fullmatch(t):
        t = t.replace(",", "")
    try:
        if "/" in t:
            num, _, den = t.partition("/")
            if not (_NUMBER.fullmatch(num.strip()) and _NUMBER.fullmatch(den.strip())):
                return None
            value = float(Fraction(num.strip()) / Fraction(den.strip()))
        elif _NUMBER.fullmatch(t):
            value = float(t)
        else:
            return None
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    value = -value if sign == "-" else value
    return value if math.isfinite(value) else None


def parse_object(text: Any) -> dict[str, Any] | None:
    r"""Exactly one JSON object (optionally in one ```json fence), or None.

    >>> parse_object('```json\n{"a": 1}\n```'), parse_object('{"a": 1}{"a": 2}')
    ({'a': 1}, None)
    >>> parse_object('{"a": 1, "a": 2}') is None  # two values for one field
    True
    """
    if isinstance(text, Mapping):
        return dict(text)
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    return json_object(text)


def canonical_value(value: Any) -> str:
    """A JSON field's value as compared: text normalised, numbers (also written as text) canonical.

    >>> canonical_value(" ACME  Corp "), canonical_value("$12.50"), canonical_value(12.5)
    ('acme corp', '12.5', '12.5')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    number = parse_number(value) if isinstance(value, (str, int, float)) else None
    if number is not None:
        return format_number(number)
    if isinstance(value, str):
        return normalize_text(value)
    if isinstance(value, list):
        return json.dumps([canonical_value(v) for v in value])
    if isinstance(value, dict):
        return json.dumps({str(k): canonical_value(v) for k, v in value.items()}, sort_keys=True)
    return normalize_text(str(value))


def field_f1(predicted: Mapping[str, Any], gold: Mapping[str, Any]) -> float:
    """F1 of the predicted fields against the gold ones (a field counts when its canonical value matches).

    >>> field_f1({"a": 1, "b": "X"}, {"a": "1", "b": "x"}), field_f1({"a": 1, "c": 2}, {"a": 1, "b": 2})
    (1.0, 0.5)
    """
    if not predicted or not gold:
        return 0.0
    hits = sum(k in gold and canonical_value(v) == canonical_value(gold[k]) for k, v in predicted.items())
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(gold)
    return 2 * precision * recall / (precision + recall)


def restrict(obj: Mapping[str, Any], fields: tuple[str, ...] | None) -> dict[str, Any]:
    """``obj`` with only ``fields`` (all of its fields when None)."""
    return dict(obj) if fields is None else {k: v for k, v in obj.items() if k in fields}


def answer_key(obj: Mapping[str, Any]) -> str:
    """A JSON answer as one hashable vote key / answer class: its canonical fields as sorted JSON."""
    return json.dumps({str(k): canonical_value(v) for k, v in obj.items()}, sort_keys=True)


def compose_object(obj: Mapping[str, Any]) -> str:
    """A JSON object as the env's demonstrations write it: one compact line, keys in their order."""
    return json.dumps(dict(obj), ensure_ascii=False)


def bounded(completion: Any) -> str | None:
    """The completion as text if it is a string of at most :data:`MAX_ANSWER_CHARS` characters, else None."""
    return completion if isinstance(completion, str) and len(completion) <= MAX_ANSWER_CHARS else None


def regex_match(pattern: re.Pattern[str], completion: Any) -> bool:
    """True when the stripped completion fully matches ``pattern`` (never raises on model output)."""
    text = bounded(completion)
    return text is not None and pattern.fullmatch(text.strip()) is not None


def call_reward(
    fn: Any, completion: Any, reference: Mapping[str, Any], params: Mapping[str, Any]
) -> float | None:
    """The named reward's score, or None when it raises, returns None or a non-finite number.

    A reward that fails on one answer is judged "not correct" here; the rubric (which calls it again in
    its worker processes) counts the failure against the reward, as for any env.
    """
    try:
        score = call_one(fn, completion if isinstance(completion, str) else "", reference, {}, params)
    except Exception:  # a reward bug must not turn into an env crash on untrusted output
        return None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return None
    return float(score)


def vote_text(completion: Any, case_sensitive: bool) -> Hashable | None:
    """The default answer class: the normalised completion, or None when empty or too long."""
    text = bounded(completion)
    if text is None:
        return None
    norm = normalize_text(text, case_sensitive)
    return norm or None


@reward_fn(range=(0.0, 1.0))
def dataset_score(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """The ``dataset`` env's graded score of an answer (``json_f1``: field F1), from its verdict; else 0.

    >>> dataset_score("", {}, {"score": 0.5}), dataset_score("", {}, {"score": "x"})
    (0.5, 0.0)
    """
    score = outcome.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return 0.0
    return min(1.0, max(0.0, float(score)))
