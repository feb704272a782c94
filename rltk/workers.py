"""A pool of worker processes that runs calls into user code (rewards) with a hard deadline per call.

    WorkerPool(fns, workers=W).run([Call(fn_index, args, kwargs), ...], timeout_s) -> [CallResult, ...]

Why processes: a deadline enforced inside the trainer (``SIGALRM``) fires only when the call returns to
Python, so a call stuck in C code (``sum(itertools.repeat(0))``, a huge regex) or one that catches the
timeout exception hangs training for good, and hung calls time out one after another. A process can always
be killed, and W of them let hung calls time out side by side.

Why fork: workers are forked from the trainer, so they already hold the functions (closures, functions
defined in a test module, plugins loaded at run time); only a call's args and kwargs and its result cross
the pipe, pickled. The usual caveat of forking a process that has threads applies: a call that needs a lock
another thread held at fork time hangs, and is then killed at its deadline like any hung call. Elsewhere
(not Linux, or no ``fork``) calls run in the calling process, one after another, with no deadline.

Batches and deadlines: :meth:`WorkerPool.run` splits the calls into chunks (a few per worker) and sends a
whole chunk to an idle worker as one message; the worker runs it in order and sends the results back when
the chunk is over (and every few milliseconds meanwhile, so little is lost with a killed worker): a step
pays IPC per chunk, not per call. Before each call a worker writes the call's position in its chunk and its
start time (``time.monotonic``, one clock for all processes on Linux) to a small shared array, so the
parent knows what each worker runs since when without asking; it sleeps in
``multiprocessing.connection.wait`` until results arrive or the earliest deadline. A call still running
``timeout_s`` after it started gets its worker SIGKILLed (nothing a call does survives that), scores
``"timeout"``, and a fresh worker is forked in its place; the calls of its chunk that had not run, or whose
results had not come back, go back to the queue (so a call may run twice: rewards are pure). A worker that
dies on its own (a segfault, ``os._exit``) scores its call ``"crashed"`` the same way. A worker with nothing
left to do takes over the second half of the calls still waiting in a busy worker's chunk (it lowers that
chunk's end in the shared array, under the worker's lock), so calls queued behind a hung one run elsewhere:
with W workers, k hung calls cost about ⌈k/W⌉ × ``timeout_s``.

Finding the workers: each names itself ``rltk-rw-<first 7 characters of the tag>`` (``/proc/<pid>/comm``,
:attr:`WorkerPool.process_name`), so ``pgrep -x <that name>`` lists a pool's workers. They
should never outlive the trainer: :meth:`WorkerPool.close` (also run by the context manager, at garbage
collection and at interpreter exit) kills and reaps them, and each worker asks the kernel to SIGKILL it when
its parent dies (``PR_SET_PDEATHSIG``; the kernel ties this to the parent *thread* that forked it, so call
:meth:`WorkerPool.run` from a thread that lives as long as the pool). Workers ignore SIGINT: a Ctrl-C in
the terminal reaches the whole process group, and the trainer handles it. A pool is not thread-safe.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import os
import pickle
import re
import secrets
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from multiprocessing import util
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, Literal, cast

from rltk.lifetime import die_with_parent

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.synchronize import Lock

logger = logging.getLogger(__name__)

Failure = Literal["raised", "timeout", "crashed"]

USE_PROCESSES = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
_CHUNKS_PER_WORKER = 4  # a few chunks per worker: a step pays IPC per chunk, yet work can rebalance
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_FLUSH_S = 0.01  # a worker sends the results it holds at least this often, and at the end of each chunk
_START, _POS, _STOP = 0, 1, 2  # the shared array of a worker: current call's start time, its position, end
_PR_SET_NAME = 15  # from <linux/prctl.h>


@dataclass(frozen=True)
class Call:
    """One call: ``fns[fn](*args, **kwargs)``; args and kwargs must pickle."""

    fn: int
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CallResult:
    """What one call gave.

    Attributes:
        value: The return value (``None`` when the call failed).
        failure: ``None`` when it returned; ``"raised"`` (any exception, including ``SystemExit``, or a
            result or arguments that do not pickle), ``"timeout"`` or ``"crashed"`` (its worker died).
        detail: The exception's repr and where it was raised, or what happened.

    """

    value: Any = None
    failure: Failure | None = None
    detail: str = ""


def _describe(e: BaseException) -> str:
    """``repr(e)`` and the innermost frame of its traceback."""
    try:
        text = repr(e)
    except Exception:  # a broken __repr__ must not turn a reward's error into a crashed worker
        text = f"<{type(e).__name__} whose repr fails>"
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        f = frames[-1]
        text += f" at {f.filename}:{f.lineno} in {f.name}" + (f": {f.line}" if f.line else "")
    return text


def _call(fn: Callable[..., Any], payload: bytes) -> bytes:
    """Run one call from its pickled args; return its pickled ``(value, failure, detail)``."""
    try:
        args, kwargs = pickle.loads(payload)
        value = fn(*args, **kwargs)
    except BaseException as e:  # untrusted code: even its SystemExit or KeyboardInterrupt is its failure
        return pickle.dumps((None, "raised", _describe(e)), _PROTOCOL)
    try:
        return pickle.dumps((value, None, ""), _PROTOCOL)
    except BaseException as e:
        detail = f"its result ({type(value).__name__}) cannot be pickled: {e!r}"
        return pickle.dumps((None, "raised", detail), _PROTOCOL)


def _serve(
    fns: Sequence[Callable[..., Any]],
    conn: Connection,
    lock: Lock,
    ctl: ctypes.Array[ctypes.c_double],
    name: str,
    parent: int,
) -> None:
    """A worker's life: receive a chunk, run its calls in order, send their results in a few messages.

    A message is ``(results, done)``: the next results of the chunk, each pickled on its own, and whether the
    chunk is over. Results wait in the worker for up to :data:`_FLUSH_S` (or the chunk's end), so a cheap
    chunk costs one message; those of a worker that is killed are lost and their calls run again.
    """
    # prctl cannot fail with these arguments
    ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    if not die_with_parent(parent, signal.SIGKILL):  # the parent is gone already: nobody would kill us
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's handler (a checkpoint on SIGTERM, say)
    while True:
        try:
            chunk = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        results, sent = [], time.monotonic()
        for i, (fn, payload) in enumerate(chunk):
            with lock:  # the parent may lower _STOP to take the calls not yet started
                if i >= ctl[_STOP]:
                    break
                ctl[_START] = time.monotonic()  # before _POS: a reader seeing the new _POS sees its start
                ctl[_POS] = i
            results.append(_call(fns[fn], payload))
            if time.monotonic() - sent >= _FLUSH_S:
                conn.send_bytes(pickle.dumps((results, False), _PROTOCOL))
                results, sent = [], time.monotonic()
        conn.send_bytes(pickle.dumps((results, True), _PROTOCOL))


@dataclass(eq=False)
class _Worker:
    """The parent's view of one worker: its current chunk (call indices) and how far its results came."""

    proc: BaseProcess
    conn: Connection
    lock: Lock
    ctl: ctypes.Array[ctypes.c_double]
    chunk: list[int] = field(default_factory=list)
    stop: int = 0  # the chunk's end, lowered when another worker takes over its tail
    received: int = 0  # results received: the next one is for chunk[received]
    busy: bool = False  # a chunk was sent and its last message has not come back


@dataclass(eq=False)
class _Run:
    """The state of one :meth:`WorkerPool.run`."""

    jobs: list[tuple[int, bytes]]  # per call: its function's index and its pickled (args, kwargs)
    results: list[CallResult | None]
    queue: deque[list[int]]
    timeout_s: float
    left: int

    def record(self, index: int, message: bytes) -> None:
        try:
            result = CallResult(*pickle.loads(message))
        except Exception as e:
            result = CallResult(failure="raised", detail=f"its result cannot be unpickled: {e!r}")
        self.results[index] = result
        self.left -= 1


def _kill_all(workers: list[_Worker]) -> None:
    """SIGKILL every worker, then reap them and close their pipes; empties ``workers``."""
    for w in workers:
        w.proc.kill()
    for w in workers:
        w.proc.join()
        w.proc.close()
        w.conn.close()
    workers.clear()


@cache
def _warn_in_process() -> None:
    logger.warning("no fork on this platform: calls run in this process, one by one, with no deadline")


class WorkerPool:
    """Worker processes, forked on the first :meth:`run` and reused, that run ``fns`` with hard deadlines.

    Args:
        fns: The functions a :class:`Call` may name by index.
        workers: How many worker processes.
        tag: Names the workers ``rltk-rw-<tag[:7]>`` (letters, digits, ``_`` and ``-``; random if ``None``).

    """

    def __init__(self, fns: Sequence[Callable[..., Any]], workers: int = 2, tag: str | None = None) -> None:
        if workers < 1:
            raise ValueError(f"a worker pool needs workers >= 1, got {workers!r}")
        self.tag = secrets.token_hex(3) if tag is None else tag
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.tag):
            raise ValueError(f"a worker pool's tag takes letters, digits, '_' and '-', got {self.tag!r}")
        self.fns = list(fns)
        self.workers = int(workers)
        self._ctx = multiprocessing.get_context("fork") if USE_PROCESSES else None
        self._procs: list[_Worker] = []
        self._closed = False
        # Runs at close(), at garbage collection, and at exit before multiprocessing joins its children
        # (which would wait forever for a live worker); it is ignored in forked processes.
        self._finalizer = util.Finalize(self, _kill_all, args=(self._procs,), exitpriority=10)

    @property
    def process_name(self) -> str:
        """The workers' process name (``/proc/<pid>/comm``), for ``pgrep``."""
        return f"rltk-rw-{self.tag[:7]}"

    def pids(self) -> list[int]:
        """The process ids of the live workers (none before the first :meth:`run`)."""
        return [w.proc.pid for w in self._procs]

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill and reap every worker; idempotent. The pool cannot run calls afterwards."""
        self._closed = True
        self._finalizer()

    def run(self, calls: Sequence[Call], timeout_s: float) -> list[CallResult]:
        """Run ``calls`` on the workers; return their results in call order.

        Any exception in the parent (a ``KeyboardInterrupt``) kills every worker before it propagates: they
        hold calls of a run that is over. The next run forks new ones.

        Args:
            calls: The calls; each names a function by its index in ``fns``.
            timeout_s: Each call's deadline, in seconds from its start.

        Returns:
            One :class:`CallResult` per call.

        Raises:
            ValueError: A bad ``timeout_s`` or function index.
            RuntimeError: The pool is closed.

        """
        if self._closed:
            raise RuntimeError("this worker pool is closed")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        bad = [c.fn for c in calls if not 0 <= c.fn < len(self.fns)]
        if bad:
            raise ValueError(f"calls name functions {sorted(set(bad))}, the pool has {len(self.fns)}")
        if self._ctx is None:
            return self._run_here(calls)
        state = self._plan(calls, timeout_s)
        try:
            while len(self._procs) < self.workers:
                self._procs.append(self._spawn())
            while state.left:
                self._dispatch(state)
                self._collect(state)
        except BaseException:
            _kill_all(self._procs)
            raise
        return cast("list[CallResult]", state.results)  # state.left == 0: every call has its result

    def _run_here(self, calls: Sequence[Call]) -> list[CallResult]:
        _warn_in_process()
        results = []
        for c in calls:
            try:
                results.append(CallResult(self.fns[c.fn](*c.args, **c.kwargs)))
            except Exception as e:
                results.append(CallResult(failure="raised", detail=_describe(e)))
        return results

    def _plan(self, calls: Sequence[Call], timeout_s: float) -> _Run:
        """Pickle each call's arguments (a failure fails that call only) and split the calls into chunks."""
        results: list[CallResult | None] = [None] * len(calls)
        jobs, todo = [], []
        for i, c in enumerate(calls):
            try:
                jobs.append((c.fn, pickle.dumps((c.args, dict(c.kwargs)), _PROTOCOL)))
                todo.append(i)
            except Exception as e:
                jobs.append((c.fn, b""))
                results[i] = CallResult(failure="raised", detail=f"its arguments cannot be pickled: {e!r}")
        size = max(1, math.ceil(len(todo) / (self.workers * _CHUNKS_PER_WORKER)))
        queue = deque(todo[j : j + size] for j in range(0, len(todo), size))
        return _Run(jobs, results, queue, timeout_s, len(todo))

    def _spawn(self) -> _Worker:
        assert self._ctx is not None
        conn, child_conn = self._ctx.Pipe()
        lock, ctl = self._ctx.Lock(), self._ctx.RawArray("d", 3)
        args = (self.fns, child_conn, lock, ctl, self.process_name, os.getpid())
        proc = self._ctx.Process(target=_serve, args=args, name=self.process_name)
        proc.start()
        child_conn.close()  # so the parent reads EOF once the worker is gone
        return _Worker(proc, conn, lock, ctl)

    def _dispatch(self, state: _Run) -> None:
        """Give every idle worker the next chunk, or else the tail of a busy worker's chunk."""
        for w in [w for w in self._procs if not w.busy]:
            chunk = state.queue.popleft() if state.queue else self._steal()
            if not chunk:
                return
            w.ctl[_START], w.ctl[_POS], w.ctl[_STOP] = 0.0, -1, len(chunk)
            w.chunk, w.stop, w.received, w.busy = chunk, len(chunk), 0, True
            message = pickle.dumps([state.jobs[i] for i in chunk], _PROTOCOL)
            try:
                w.conn.send_bytes(message)
            except OSError:  # it died while idle (killed from outside): its chunk goes back to the queue
                self._replace(w, state, None, -1)

    def _steal(self) -> list[int]:
        """Take the second half of the calls not yet started in the busy worker that has the most."""
        busy = [w for w in self._procs if w.busy]
        if not busy:
            return []
        victim = max(busy, key=lambda w: w.stop - int(w.ctl[_POS]))
        # A timeout, in case the victim was killed from outside while holding its lock.
        if not victim.lock.acquire(timeout=1.0):
            return []
        try:
            waiting = victim.stop - int(victim.ctl[_POS]) - 1
            if waiting < 1:
                return []
            end, victim.stop = victim.stop, victim.stop - (waiting + 1) // 2
            victim.ctl[_STOP] = victim.stop
            return victim.chunk[victim.stop : end]
        finally:
            victim.lock.release()

    def _collect(self, state: _Run) -> None:
        """Wait for results or the next deadline; replace the workers that died or ran past a deadline."""
        busy = {w.conn: w for w in self._procs if w.busy}
        if not busy:
            return
        now = time.monotonic()
        # A worker between calls counts as starting now: the wait ends before its next call's deadline.
        due = min(start if pos >= 0 else now for pos, start in map(self._running, busy.values()))
        for conn in wait(list(busy), timeout=max(0.0, due + state.timeout_s - now)):
            w = busy[conn]
            if not self._drain(w, state):
                self._replace(w, state, "crashed", int(w.ctl[_POS]))
        now = time.monotonic()
        for w in busy.values():
            pos, start = self._running(w)
            if w in self._procs and pos >= 0 and now - start >= state.timeout_s:
                self._replace(w, state, "timeout", pos)

    @staticmethod
    def _running(w: _Worker) -> tuple[int, float]:
        """``(position in its chunk, start time)`` of the call ``w`` runs, or ``(-1, 0.0)`` between calls."""
        pos = int(w.ctl[_POS])  # before the start time, which the worker writes first
        start = w.ctl[_START]
        return (pos, start) if w.busy and pos >= w.received else (-1, 0.0)

    @staticmethod
    def _drain(w: _Worker, state: _Run) -> bool:
        """Record every message waiting from ``w``; False once its pipe is at its end (the worker died)."""
        try:
            while w.conn.poll():
                results, done = pickle.loads(w.conn.recv_bytes())
                for result in results:
                    state.record(w.chunk[w.received], result)
                    w.received += 1
                w.busy = not done
        except (EOFError, OSError):  # OSError: it died in the middle of a message
            return False
        return True

    def _replace(self, w: _Worker, state: _Run, failure: Failure | None, pos: int) -> None:
        """Kill and reap ``w``, score its call at ``pos`` (if no result came), requeue the rest, fork anew."""
        w.proc.kill()
        w.proc.join()
        self._drain(w, state)  # the results it sent before it died
        rest = w.chunk[w.received : w.stop] if w.busy else []  # not run, or their results were lost
        if failure is not None and w.busy and w.received <= pos < w.stop:
            code = w.proc.exitcode
            if failure == "timeout":
                detail = f"still running after {state.timeout_s:g} s: its worker was killed"
            elif code is not None and code < 0:
                detail = f"its worker died of {signal.Signals(-code).name}"
            else:
                detail = f"its worker exited with code {code}"
            state.results[w.chunk[pos]] = CallResult(failure=failure, detail=detail)
            state.left -= 1
            rest.remove(w.chunk[pos])
        if rest:
            state.queue.appendleft(rest)
        w.proc.close()
        w.conn.close()
        self._procs.remove(w)
        self._procs.append(self._spawn())
