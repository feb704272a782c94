"""A guarded SQLite sandbox for untrusted queries, run in a worker process; results compared by value.

A :class:`Database` is a handle on an in-memory database held by one small worker process
(:mod:`rltk_envs.sqlite_worker`), shared by every database of this process and started on first use.
:meth:`Database.run` sends one statement and waits for its rows; every refusal or failure is a
:class:`SqlError` whose message can go back to the model. :func:`same_result` compares result rows by
value, :func:`show` writes them as compact text.

Why a separate process: in the trainer, one model-written query could allocate hundreds of MB (a sort, a
window or a UNION over wide rows) and SQLite's own memory cap, ``hard_heap_limit``, is process-wide: shared
by every live in-memory database, so a bomb in one rollout would fail the queries of the others. The worker
instead runs under ``RLIMIT_AS`` (its own address space only), writes no file and dies with the trainer;
it answers one query at a time, so each query has the whole cap. The parent adds a deadline the worker cannot
overrun (some SQLite work happens inside one VM step, out of the progress handler's reach): past
``WALL_S + DEADLINE_MARGIN_S`` it kills the worker. After a kill, a crash or a failed allocation, the next
query starts a fresh worker, and every handle resends its tables and rows when the worker lacks them (the
parent keeps them), so other episodes' results never change.
"""

from __future__ import annotations

import atexit
import itertools
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from queue import SimpleQueue
from typing import Any

from rltk_envs import sqlite_worker as worker

MAX_SQL_CHARS, WALL_S = worker.MAX_SQL_CHARS, worker.WALL_S
DEADLINE_MARGIN_S = 0.1  # the parent's deadline: the worker's budget, plus scheduling and pickling
BUILD_TIMEOUT_S = 30.0  # starting a worker and building a database take milliseconds; this is generous
MAX_DATABASES = 128  # held by the worker at once (least recently used dropped first, rebuilt on demand)
SHOW_ROWS, SHOW_CHARS = 12, 600
_FENCE = re.compile(r"^```(?:sql)?\s*|\s*```$", re.IGNORECASE)


def bare_sql(text: str) -> str:
    """A query as the sandbox runs it: code fence, surrounding space and trailing semicolons dropped.

    >>> bare_sql("```sql SELECT 1; ```")
    'SELECT 1'
    """
    return _FENCE.sub("", text.strip()).strip().rstrip(";").strip()


_WORKER_ERRORS = (EOFError, OSError, pickle.UnpicklingError, ValueError)  # died, or answered nonsense


class SqlError(Exception):
    """A query the sandbox refused, or that failed or ran past a limit (its message is the observation)."""


class _Worker:
    """This process's worker: started on demand, stopped after a timeout, a crash or a failed allocation.

    Requests are serialized by a lock. Handles that are closed or collected are queued in ``forgotten`` (a
    deque: a finalizer may run in any thread, even inside a request) and dropped with the next request.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.home = ""
        self.loaded: OrderedDict[int, None] = OrderedDict()  # the worker's databases, least recent first
        self.forgotten: deque[int] = deque()

    def query(self, db: Database, sql: str, max_rows: int) -> tuple[list[str], list[tuple]]:
        """Run ``sql`` on ``db`` (building it in the worker first if needed): (columns, rows)."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:  # none yet, or it died between requests
                self.stop()
                self._start()
            drop = self._drop_list(making_room=db.key not in self.loaded)
            if db.key not in self.loaded:
                try:
                    self._call(("build", drop, db.key, db.tables, db.rows), BUILD_TIMEOUT_S)
                except (TimeoutError, *_WORKER_ERRORS) as exc:
                    self.stop()
                    raise RuntimeError("the SQLite worker failed to build a database") from exc
                except BaseException:
                    # interrupted (the env watchdog, Ctrl-C): a late reply would answer the next request
                    self.stop()
                    raise
                self.loaded[db.key], drop = None, []
            self.loaded.move_to_end(db.key)
            try:
                reply = self._call(("query", drop, db.key, sql, max_rows), WALL_S + DEADLINE_MARGIN_S)
            except TimeoutError:
                self.stop()
                raise SqlError(worker.TOO_SLOW) from None
            except _WORKER_ERRORS:
                self.stop()
                raise SqlError(worker.OUT_OF_MEMORY) from None
            except BaseException:
                # interrupted (the env watchdog, Ctrl-C): a late reply would answer the next request
                self.stop()
                raise
            if reply[0] == "rows":
                return reply[1], reply[2]
            if reply[2]:  # a failed allocation: start the next query on a fresh worker
                self.stop()
            raise SqlError(reply[1])

    def _drop_list(self, making_room: bool) -> list[int]:
        """The databases to drop: the forgotten handles', and the least recent ones when making room."""
        drop = []
        while self.forgotten:
            key = self.forgotten.popleft()
            if self.loaded.pop(key, False) is None:
                drop.append(key)
        while making_room and len(self.loaded) >= MAX_DATABASES:
            drop.append(self.loaded.popitem(last=False)[0])
        return drop

    def _call(self, request: tuple, timeout: float) -> Any:
        """Send one request and wait ``timeout`` seconds for its reply."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        worker.send(self.proc.stdin.fileno(), request)
        return worker.receive(self.proc.stdout.fileno(), time.monotonic() + timeout)

    def _start(self) -> None:
        """Start a worker in a fresh empty folder, from a thread that lives exactly as long as the worker.

        ``PR_SET_PDEATHSIG`` fires when the *thread* that started the child ends, so a worker started from a
        short-lived thread (a pool's, say) would die with it, in the middle of another episode's query.
        """
        self.home = tempfile.mkdtemp(prefix="rltk_sql_")
        env = {**os.environ, "TMPDIR": self.home, "SQLITE_TMPDIR": self.home}
        cmd = [sys.executable, "-I", worker.__file__, str(os.getpid())]
        started: SimpleQueue[subprocess.Popen[bytes] | Exception] = SimpleQueue()

        def host() -> None:
            try:
                pipe = subprocess.PIPE
                proc = subprocess.Popen(
                    cmd, stdin=pipe, stdout=pipe, stderr=subprocess.DEVNULL, cwd=self.home, env=env, bufsize=0
                )
            except Exception as exc:  # handed to the caller, which raises it
                started.put(exc)
                return
            started.put(proc)
            proc.wait()

        threading.Thread(target=host, name="sqlite-worker-host", daemon=True).start()
        proc = started.get()
        if isinstance(proc, Exception):
            raise proc
        self.proc = proc
        self.loaded.clear()

    def stop(self) -> None:
        """Kill the worker (if any) and remove its folder; the next request starts a fresh one."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
            shutil.rmtree(self.home, ignore_errors=True)
        self.proc = None
        self.loaded.clear()

    def after_fork(self) -> None:
        """In a forked child: leave the parent's worker alone (its pipes are the parent's); start anew."""
        self.__init__()


_WORKER = _Worker()
atexit.register(_WORKER.stop)
os.register_at_fork(after_in_child=_WORKER.after_fork)


class Database:
    """A read-only in-memory database for untrusted queries, held by the worker process.

    The handle keeps the tables and rows, so a fresh worker can rebuild the database; it is built on the
    first query. Close it (or use it as a context manager) to free the worker's copy at once; otherwise that
    happens when the handle is collected, or when the worker needs room.

    Args:
        tables: ``{table name: column definitions}`` (``"id INTEGER PRIMARY KEY"``, ``"name"``), created in
            this order.
        rows: ``{table name: rows}``, inserted into each table after it is created.

    """

    _keys = itertools.count()

    def __init__(self, tables: Mapping[str, Sequence[str]], rows: Mapping[str, Sequence[tuple]]) -> None:
        self.tables, self.rows = dict(tables), dict(rows)  # plain dicts: the worker unpickles plain data only
        self.key = next(self._keys)
        weakref.finalize(self, _WORKER.forgotten.append, self.key)

    def run(self, sql: str, max_rows: int) -> tuple[list[str], list[tuple]]:
        """Run one statement within the step, time and memory budgets: (columns, up to ``max_rows + 1`` rows).

        Raises:
            SqlError: The query was refused, failed, or ran past a limit (the message says which).

        """
        sql = bare_sql(sql)
        if not sql:
            raise SqlError("empty query: write one SELECT statement")
        if len(sql) > MAX_SQL_CHARS:
            raise SqlError(f"query longer than {MAX_SQL_CHARS} characters")
        return _WORKER.query(self, sql, max_rows)

    def close(self) -> None:
        """Free the worker's copy (a later query would rebuild it)."""
        _WORKER.forgotten.append(self.key)

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


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
