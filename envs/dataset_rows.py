"""From data rows to the ``dataset`` env's records: prompt, reference, split and stable key per row.

A row is *bad* (reported by number, never trained on or scored) when a column its prompt reads has no
value, its prompt renders empty, its reference is missing or does not parse for the check (not a number,
not a JSON object, not one of the labels, not a regular expression), its split value is unknown, or its
demonstration (``demo_column``) is missing or fails its own row's check.

Splits never depend on the rendered prompt nor on a row's position: a row's **key** is the hash of its id
column, or of its normalised input columns (every column but the reference, split and demonstration ones,
unless ``hash_columns`` names them), and its split is either its split column's value or the key's place
in ``[0, 1)`` against the cumulative ``split_ratios``. Appending rows or rewriting the prompt template
moves no row.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from rltk_envs.dataset_checks import (
    answer_key,
    as_text,
    compose_object,
    format_number,
    normalize_text,
    parse_number,
    parse_object,
    restrict,
)
from rltk_envs.dataset_load import Table
from rltk_envs.dataset_options import Options

from rltk.env import Message

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "eval": "eval",
    "validation": "eval",
    "valid": "eval",
    "val": "eval",
    "dev": "eval",
    "test": "test",
}
MAX_LISTED = 100  # row numbers listed per reason in one message (env.bad_rows keeps them all)


@dataclass(frozen=True)
class Record:
    """One good row.

    Attributes:
        row: 1-based data row number in the file.
        key: Hex sha256 of the row's id or normalised input columns (its split and task id come from it).
        split: ``"train"``, ``"eval"`` or ``"test"``.
        messages: What the model sees (system message if any, then the user prompt).
        answer: The answer text the check accepts for this row: what the oracle and the warm start write.
        value: The parsed reference (normalised text, canonical label, number, JSON object, pattern).
        label: The reference's answer class (hashable text): what baselines and per-label tags count.
        reference: The reference cell as text.

    """

    row: int
    key: str
    split: str
    messages: list[Message]
    answer: str
    value: Any
    label: str
    reference: str


@dataclass(frozen=True)
class BadRow:
    """A row left out, and why."""

    row: int
    reason: str


def choice_labels(opts: Options, table: Table) -> dict[str, str]:
    """Normalised label → its spelling in answers: the ``labels`` option, else every reference in the data.

    Labels found in the data are sorted by their normalised text, so that the label hint in the prompt
    does not depend on row order.
    """
    if opts.labels is not None:
        return {normalize_text(label, opts.case_sensitive): label.strip() for label in opts.labels}
    found: dict[str, str] = {}
    for row in table.rows:
        text = as_text(row.get(opts.reference_column))
        if text is not None and text.strip():
            found.setdefault(normalize_text(text, opts.case_sensitive), text.strip())
    return dict(sorted(found.items()))


def system_message(opts: Options, labels: dict[str, str]) -> str | None:
    """The system message: ``system``, plus for the choice check the label set (``label_hint``)."""
    parts = [opts.system] if opts.system else []
    if opts.check == "choice" and opts.label_hint and labels:
        parts.append(f"Answer with one of: {', '.join(labels.values())}.")
    return "\n".join(parts) or None


def row_key(opts: Options, table: Table, row: dict[str, Any]) -> str | None:
    """The row's stable key, or None when its id is missing."""
    if opts.id_column is not None:
        ident = as_text(row.get(opts.id_column))
        if ident is None or not ident.strip():
            return None
        payload = "id\0" + ident.strip()
    else:
        skip = {opts.reference_column, opts.split_column, opts.demo_column}
        columns = opts.hash_columns or tuple(c for c in table.columns if c not in skip)
        values = {c: normalize_text(as_text(row.get(c)) or "") for c in columns}
        payload = "columns\0" + json.dumps(values, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def hashed_split(key: str, ratios: tuple[float, float, float]) -> str:
    """The split of a key: its first 52 bits as a fraction of 1, against the cumulative ratios.

    >>> hashed_split("0" * 64, (0.8, 0.1, 0.1)), hashed_split("f" * 64, (0.8, 0.1, 0.1))
    ('train', 'test')
    """
    u = int(key[:13], 16) / 16**13
    total = sum(ratios)
    if u < ratios[0] / total:
        return "train"
    return "eval" if u < (ratios[0] + ratios[1]) / total else "test"


def parse_reference(opts: Options, raw: Any, labels: dict[str, str]) -> tuple[Any, str, str] | str:
    """(parsed value, answer text, answer class) of a reference cell, or why it does not parse."""
    text = as_text(raw)
    if text is None or not text.strip():
        return f"missing reference (column {opts.reference_column!r})"
    shown = text if len(text) <= 60 else text[:57] + "..."
    if opts.check == "choice":
        norm = normalize_text(text, opts.case_sensitive)
        if norm not in labels:
            return f"reference {shown!r} is not one of the labels {list(labels.values())}"
        return labels[norm], labels[norm], labels[norm]
    if opts.check == "numeric":
        number = parse_number(text)
        if number is None:
            return f"reference {shown!r} is not a number"
        return number, text.strip(), format_number(number)
    if opts.check == "json_f1":
        obj = parse_object(raw if isinstance(raw, dict) else text)
        if obj is None:
            return f"reference {shown!r} is not one JSON object"
        lacking = [f for f in opts.json_fields or () if f not in obj]
        if lacking:
            return f"reference object lacks the fields {lacking} (json_fields)"
        obj = restrict(obj, opts.json_fields)
        if not obj:
            return "reference object has no fields"
        return obj, compose_object(obj), answer_key(obj)
    if opts.check == "regex":
        try:
            pattern = re.compile(text.strip())
        except re.error as exc:
            return f"reference {shown!r} is not a valid regular expression ({exc})"
        return pattern, "", text.strip()
    return normalize_text(text, opts.case_sensitive), text.strip(), normalize_text(text, opts.case_sensitive)


def render_prompt(opts: Options, row: dict[str, Any], system: str | None) -> list[Message] | str:
    """The row's messages, or why it has none (a prompt column without a value, an empty prompt)."""
    values: dict[str, str] = {}
    for column in opts.prompt_columns:
        text = as_text(row.get(column))
        if text is None or not text.strip():
            return (
                f"empty prompt (column {column!r})"
                if opts.prompt_column
                else f"missing value in column {column!r}"
            )
        values[column] = text
    user = (
        values[opts.prompt_column] if opts.prompt_column else (opts.prompt_template or "").format_map(values)
    )
    if not user.strip():
        return "empty prompt"
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def row_split(opts: Options, row: dict[str, Any], key: str) -> str | None:
    """The row's split: its split column's value (None if unknown), else from its key."""
    if opts.split_column is None:
        return hashed_split(key, opts.split_ratios)
    return SPLIT_NAMES.get((as_text(row.get(opts.split_column)) or "").strip().lower())


def build_record(
    opts: Options, table: Table, i: int, system: str | None, labels: dict[str, str], demo_ok: Any
) -> Record | BadRow:
    """Row ``i`` (0-based) as a record, or as a bad row with its reason.

    ``demo_ok(record, demo_text) -> bool`` judges a demonstration against its row's check.
    """
    row, number = table.rows[i], i + 1
    messages = render_prompt(opts, row, system)
    if isinstance(messages, str):
        return BadRow(number, messages)
    parsed = parse_reference(opts, row.get(opts.reference_column), labels)
    if isinstance(parsed, str):
        return BadRow(number, parsed)
    value, answer, label = parsed
    key = row_key(opts, table, row)
    if key is None:
        return BadRow(number, f"missing id (column {opts.id_column!r})")
    split = row_split(opts, row, key)
    if split is None:
        seen = as_text(row.get(opts.split_column))
        return BadRow(number, f"split value {seen!r} is not one of {sorted(SPLIT_NAMES)}")
    reference = as_text(row.get(opts.reference_column)) or ""
    record = Record(number, key, split, messages, answer, value, label, reference)
    if opts.demo_column is not None:
        demo = as_text(row.get(opts.demo_column))
        if demo is None or not demo.strip():
            return BadRow(number, f"missing demonstration (column {opts.demo_column!r})")
        record = Record(number, key, split, messages, demo.strip(), value, label, reference)
        if not demo_ok(record, demo.strip()):
            return BadRow(number, f"demonstration (column {opts.demo_column!r}) fails its own row's check")
    return record


def bad_row_report(table: Table, bad: list[BadRow], total: int) -> str:
    """One message naming every bad row by number, grouped by reason (at most 100 numbers per reason)."""
    by_reason: dict[str, list[int]] = defaultdict(list)
    for b in bad:
        by_reason[b.reason].append(b.row)
    counted = (
        "data rows from 1, the header not counted; line = first line in the file" if table.lines else "from 1"
    )
    lines = [f"dataset {table.path}: {len(bad)} of {total} rows left out, not trained on or scored "]
    lines[0] += f"(rows counted {counted}):"
    for reason, rows in by_reason.items():
        listed = ", ".join(table.where(r) for r in rows[:MAX_LISTED])
        more = f" and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else ""
        lines.append(f"  {reason}: row{'s' if len(rows) > 1 else ''} {listed}{more}")
    return "\n".join(lines)
