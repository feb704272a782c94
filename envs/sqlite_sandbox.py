"""A guarded SQLite sandbox for untrusted queries: a read-only in-memory database, budgets, result compare.

:func:`open_readonly` builds a database in memory (a ``memdb`` database written through a read-write
connection, then opened ``mode=ro``) and returns the only connection to it, with an authorizer (SELECT,
reads and functions only: no ATTACH, PRAGMA, write or DDL) and caps on SQL length and value size. :func:`run`
runs one statement within a VM-step and wall-time budget; every refusal or failure is a :class:`SqlError`
whose message can go back to the model. :func:`same_result` compares result rows by value, :func:`show`
writes them as compact text.
"""

from __future__ import annotations

import itertools
import math
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

MAX_SQL_CHARS, MAX_VALUE_CHARS, VM_STEPS, WALL_S = 2000, 10_000, 2_000_000, 0.5
SHOW_ROWS, SHOW_CHARS = 12, 600
_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
# printf('%.*c', 2e9, 'x') runs for seconds inside one VM step, out of the progress handler's reach
_DENIED_FUNCTIONS = {"printf", "format", "load_extension"}
_FENCE = re.compile(r"^```(?:sql)?\s*|\s*```$", re.IGNORECASE)


class SqlError(Exception):
    """A query the sandbox refused, or that failed or ran past a limit (its message is the observation)."""


def _authorize(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
    """Allow reads, SELECT, recursive CTEs and functions (less a few); deny everything else."""
    denied = action not in _ALLOWED or (
        action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in _DENIED_FUNCTIONS
    )
    return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK


def open_readonly(
    tables: Mapping[str, Sequence[str]], rows: Mapping[str, Sequence[tuple]]
) -> sqlite3.Connection:
    """Build a database in memory and return a guarded read-only connection to it (the only one).

    Args:
        tables: ``{table name: column definitions}`` (``"id INTEGER PRIMARY KEY"``, ``"name"``), created in
            this order.
        rows: ``{table name: rows}``, inserted into each table after it is created.

    """
    uri = f"file:/sqlite_sandbox_{uuid.uuid4().hex}?vfs=memdb"
    rw = sqlite3.connect(uri, uri=True)
    for name, columns in tables.items():  # the table, then its rows
        rw.execute(f"CREATE TABLE {name} ({', '.join(columns)})")
        marks = ", ".join("?" * len(columns))
        rw.executemany(f"INSERT INTO {name} VALUES ({marks})", rows[name])
    rw.commit()
    ro = sqlite3.connect(f"{uri}&mode=ro", uri=True, check_same_thread=False)
    rw.close()  # the read-only connection keeps the database alive; it goes with the connection
    ro.set_authorizer(_authorize)
    ro.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_CHARS)
    ro.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_CHARS)
    return ro


def run(conn: sqlite3.Connection, sql: str, max_rows: int) -> tuple[list[str], list[tuple]]:
    """Run one statement within the VM-step and time budget: (column names, up to ``max_rows + 1`` rows)."""
    sql = _FENCE.sub("", sql.strip()).strip().rstrip(";").strip()
    if not sql:
        raise SqlError("empty query: write one SELECT statement")
    if len(sql) > MAX_SQL_CHARS:
        raise SqlError(f"query longer than {MAX_SQL_CHARS} characters")
    budget = {"calls": VM_STEPS // 1000, "deadline": time.monotonic() + WALL_S}

    def tick() -> bool:  # True stops the query
        budget["calls"] -= 1
        return budget["calls"] < 0 or time.monotonic() > budget["deadline"]

    conn.set_progress_handler(tick, 1000)
    try:
        cur = conn.execute(sql)
        if cur.description is None:
            raise SqlError("not a query: write one SELECT statement")
        return [d[0] for d in cur.description], cur.fetchmany(max_rows + 1)
    except Exception as exc:  # sqlite errors, values Python cannot decode: all are observations
        why = "too slow, stopped (use a smaller query)" if "interrupt" in str(exc) else str(exc)
        raise SqlError(why) from None
    finally:
        conn.set_progress_handler(None, 0)


def _number(v: float) -> float:
    """Rounded to 2 decimals, half away from zero like SQLite's ``ROUND`` (after 9, against float noise)."""
    if not math.isfinite(v):
        return v
    return float(Decimal(repr(round(v, 9))).quantize(Decimal("0.01"), ROUND_HALF_UP))


def normalize(rows: list[tuple] | list[list]) -> list[tuple]:
    """Rows with numbers as floats rounded to 2 decimals (blobs as hex), so results compare by value.

    >>> normalize([(112515.625, 3, "a"), (0.1 + 0.2, None, b"x")])
    [(112515.63, 3.0, 'a'), (0.3, None, '78')]
    """
    kinds = {int: _number, float: _number, bytes: bytes.hex}
    return [tuple(kinds.get(type(v), lambda x: x)(v) for v in row) for row in rows]


def same_result(got: list[tuple], gold: list[tuple], ordered: bool) -> bool:
    """Whether ``got`` equals ``gold`` (normalized rows): as multisets, or as lists where order matters.

    Columns may come in any order (the same permutation for every row).

    >>> same_result([(2, "b"), (1.0, "a")], [("a", 1), ("b", 2)], ordered=False)
    True
    >>> same_result([(2, "b"), (1, "a")], [("a", 1), ("b", 2)], ordered=True)
    False
    """
    got, gold = normalize(got), normalize(gold)
    if len(got) != len(gold) or any(len(r) != len(gold[0]) for r in got):
        return False
    for perm in itertools.permutations(range(len(gold[0]))):
        moved = [tuple(r[i] for i in perm) for r in got]
        if moved == gold if ordered else Counter(moved) == Counter(gold):
            return True
    return False


def show(columns: list[str], rows: list[tuple]) -> str:
    """Rows as compact text: a header, one line per row; at most ``SHOW_ROWS`` rows and ``SHOW_CHARS``."""

    def cell(v: Any) -> str:
        return "NULL" if v is None else str(round(v, 2) if isinstance(v, float) else v)[:40]

    text = "\n".join([" | ".join(columns)] + [" | ".join(map(cell, row)) for row in rows[:SHOW_ROWS]])
    text = text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS] + " ... (cut)"
    if len(rows) > SHOW_ROWS:
        return f"{text}\n... (more than {SHOW_ROWS} rows)"
    return text if rows else f"{text}\n(no rows)"
