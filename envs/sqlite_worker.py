"""The worker process of :mod:`rltk_envs.sqlite_sandbox`: holds the databases, runs one query at a time.

Started as ``python -I sqlite_worker.py <parent pid>`` (isolated mode: no site-packages, no ``PYTHON*``
variables, not even this file's own folder on ``sys.path``), so it imports the standard library only: a few
MB, never torch. At start it confines itself (:func:`confine`): killed with its parent, no file writes, no
core dump, and an address-space cap a fixed headroom above its own baseline, so a memory bomb fails inside
this process (SQLite's allocation fails: ``MemoryError``) and not in the trainer. Then it serves requests from
stdin and answers on stdout, one frame each (:func:`send`, :func:`receive`: a 4-byte length, then a pickle of
plain data: tuples, lists, dicts, strings, numbers, bytes, ``None``; unpickling refuses anything else):

- ``("build", drop, key, tables, rows)``: build database ``key`` in memory; answers ``("ok",)``.
- ``("query", drop, key, sql, max_rows)``: run one statement on database ``key``; answers
  ``("rows", columns, rows)`` or ``("error", message, fatal)``, where ``fatal`` asks the parent for a fresh
  worker (after a failed allocation, freed memory may stay mapped and shrink the next query's headroom).

Every request first closes the databases listed in ``drop``. Each database lives in memory (a ``memdb``
database written through a read-write connection, then opened ``mode=ro``); the read-only connection is the
only one left, with an authorizer (SELECT and reads, and only the functions in :data:`FUNCTIONS`: no ATTACH,
PRAGMA, write or DDL), no attached databases at all, and caps on SQL length and value size. A query runs
within a VM-step and wall-time budget (a progress handler, called every 1000 VM steps); the parent adds its
own deadline for the work done between two calls (a sort's, or a row of 80 costly function calls).
"""

from __future__ import annotations

import ctypes
import io
import os
import pickle
import resource
import select
import signal
import sqlite3
import struct
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

MAX_SQL_CHARS, MAX_VALUE_CHARS, VM_STEPS, WALL_S = 2000, 10_000, 2_000_000, 0.5
MEMORY_HEADROOM_BYTES = 256 * 2**20  # address space a query may add to the worker's own (about 18 MB)
MAX_FRAME_BYTES = 4 * 2**20  # a reply carries at most max_rows + 1 rows; a bigger one is refused
TOO_SLOW = "too slow, stopped (use a smaller query)"
OUT_OF_MEMORY = "out of memory: use a smaller query"
TOO_LARGE = "result too large: select fewer or narrower columns"
# Deny by default: the env's gold queries use count, sum, avg, min and max; the rest are the ordinary ones a
# model may reach for. Left out on purpose: printf/format (one VM step can run for seconds), zeroblob and
# randomblob (allocation bombs), fts3_tokenizer (leaks an address; with 2 arguments, sets a pointer),
# load_extension, and everything else (JSON, math, date: the data has none of these).
FUNCTIONS = frozenset(
    {
        *("count", "sum", "total", "avg", "min", "max", "group_concat"),
        *("round", "abs", "coalesce", "ifnull", "nullif", "iif", "typeof"),
        *("lower", "upper", "length", "substr", "substring", "trim", "ltrim", "rtrim", "replace", "instr"),
        *("like", "glob"),  # the LIKE and GLOB operators call these
        *("row_number", "rank", "dense_rank"),
    }
)
_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_PR_SET_PDEATHSIG = 1


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: a frame that names any class or function is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def send(fd: int, message: Any) -> None:
    """Write one frame (length, pickle) to ``fd``; a reply too big for a frame becomes a ``TOO_LARGE`` one."""
    data = pickle.dumps(message)
    if len(data) > MAX_FRAME_BYTES:
        data = pickle.dumps(("error", TOO_LARGE, False))
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def receive(fd: int, deadline: float | None = None) -> Any:
    """Read one frame from ``fd``, waiting at most until ``deadline`` (``time.monotonic()``; None: forever).

    Raises:
        TimeoutError: The deadline passed first.
        EOFError: The other end closed the pipe, or announced a frame over ``MAX_FRAME_BYTES``.
        pickle.UnpicklingError: The frame is not plain data.

    """
    (size,) = struct.unpack(">I", _read(fd, 4, deadline))
    if size > MAX_FRAME_BYTES:
        raise EOFError(f"frame of {size} bytes")
    return _PlainUnpickler(io.BytesIO(_read(fd, size, deadline))).load()


def _read(fd: int, size: int, deadline: float | None) -> bytes:
    """Exactly ``size`` bytes from ``fd`` (poll, not select: a trainer may hold over 1024 descriptors)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    buf = bytearray()
    while len(buf) < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError
        chunk = os.read(fd, size - len(buf))
        if not chunk:
            raise EOFError("pipe closed")
        buf += chunk
    return bytes(buf)


def _authorize(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
    """Allow reads, SELECT, recursive CTEs and the functions in ``FUNCTIONS``; deny everything else."""
    allowed = action in _ACTIONS and (action != sqlite3.SQLITE_FUNCTION or str(arg2).lower() in FUNCTIONS)
    return sqlite3.SQLITE_OK if allowed else sqlite3.SQLITE_DENY


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
    ro = sqlite3.connect(f"{uri}&mode=ro", uri=True)
    rw.close()  # the read-only connection keeps the database alive; it goes with the connection
    ro.set_authorizer(_authorize)
    ro.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_CHARS)
    ro.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_CHARS)
    # no ATTACH past the authorizer, and no VACUUM INTO (which attaches its target): no file is ever opened
    ro.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    return ro


def execute(conn: sqlite3.Connection, sql: str, max_rows: int) -> tuple:
    """Run one statement within the VM-step and time budget: a ``"rows"`` or ``"error"`` reply."""
    budget = {"calls": VM_STEPS // 1000, "deadline": time.monotonic() + WALL_S}

    def tick() -> bool:  # True stops the query
        budget["calls"] -= 1
        return budget["calls"] < 0 or time.monotonic() > budget["deadline"]

    conn.set_progress_handler(tick, 1000)
    try:
        cur = conn.execute(sql)
        if cur.description is None:
            return ("error", "not a query: write one SELECT statement", False)
        return ("rows", [d[0] for d in cur.description], cur.fetchmany(max_rows + 1))
    except MemoryError:  # SQLite's allocation failed at the address-space cap
        return ("error", OUT_OF_MEMORY, True)
    except Exception as exc:  # sqlite errors, values Python cannot decode: all are observations
        return ("error", TOO_SLOW if "interrupt" in str(exc) else str(exc), False)
    finally:
        conn.set_progress_handler(None, 0)


def confine(parent: int) -> None:
    """Die with ``parent``, write no file (not even a core dump), and cap the address space (Linux).

    ``RLIMIT_AS`` caps this process alone, so a bomb cannot spend memory another episode's query needs, as
    it could under SQLite's process-wide ``hard_heap_limit``; it is set here, in a small fresh process,
    because a forked trainer already maps GBs.
    """
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write then fails with EFBIG instead of killing us
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which may still want to query
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with open("/proc/self/statm") as statm:
        baseline = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = baseline + MEMORY_HEADROOM_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def serve() -> None:
    """Answer requests from stdin on stdout until stdin closes."""
    databases: dict[int, sqlite3.Connection] = {}
    while True:
        try:
            op, drop, key, *args = receive(0)
        except EOFError:
            return
        for gone in drop:
            databases.pop(gone).close()
        try:
            if op == "build":
                databases[key] = open_readonly(*args)
                reply: tuple = ("ok",)
            else:
                reply = execute(databases[key], *args)
        except MemoryError:  # Python's own allocation failed (building rows, say)
            reply = ("error", OUT_OF_MEMORY, True)
        send(1, reply)


if __name__ == "__main__":
    confine(int(sys.argv[1]))
    serve()
