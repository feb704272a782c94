"""One JSON object in a reply: the parse of the invoice rewards and of the dataset env's ``json_f1``."""

from __future__ import annotations

import json
import re
from typing import Any

FENCE = re.compile(r"\A\s*```(?:json)?[ \t]*\n?(.*?)\n?\s*```\s*\Z", re.DOTALL | re.IGNORECASE)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook`` refusing a repeated key (two values for one field: a hedge)."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("repeated key")
    return dict(pairs)


def json_object(text: str) -> dict[str, Any] | None:
    r"""Exactly one JSON object, optionally in one ```json fence, with no repeated key; else None.

    >>> json_object('```json\n{"a": 1}\n```'), json_object('{"a": 1}{"a": 2}')
    ({'a': 1}, None)
    >>> json_object('{"a": 1, "a": 2}') is None, json_object("[1]") is None
    (True, True)
    """
    fenced = FENCE.match(text)
    body = (fenced.group(1) if fenced else text).strip()
    if not body.startswith("{"):
        return None
    try:
        obj = json.loads(body, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None
