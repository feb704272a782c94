"""The reward worker pool: results in order, failures classified, hard deadlines, re-runs, no orphans."""

from __future__ import annotations

import ctypes
import faulthandler
import itertools
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from rltk import workers
from rltk.workers import Call, CallResult, WorkerPool

ROOT = Path(__file__).resolve().parents[1]
needs_fork = pytest.mark.skipif(not workers.USE_PROCESSES, reason="worker processes need Linux and fork")


def double(x: int) -> int:
    return 2 * x


def stuck_in_c() -> None:
    sum(itertools.repeat(0))  # never returns to the interpreter: SIGALRM could not stop it


def ignores_sigterm_and_exceptions() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        try:
            while True:
                pass
        except BaseException:
            pass


def sleeps() -> None:
    time.sleep(1000)


def raises(kind: str) -> None:
    raise {"value": ValueError("bad"), "exit": SystemExit(3), "interrupt": KeyboardInterrupt()}[kind]


def segfault() -> None:
    faulthandler.disable()  # else pytest's faulthandler prints this worker's stack
    ctypes.string_at(0)


def live_workers(name: str) -> list[int]:
    """Pids of the live (not zombie) processes named ``name``: workers reparented to an init that does not
    reap them stay as zombies, which are dead."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if comm == name and state != "Z":
            pids.append(int(entry))
    return sorted(pids)


def wait_until(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def children() -> list[str]:
    """This process's child pids, zombies included."""
    return sorted(
        pid for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()
    )


@pytest.fixture
def make_pool() -> Iterator[Callable[..., WorkerPool]]:
    """Pools with a unique tag, closed at teardown, which checks that no worker is left."""
    pools: list[WorkerPool] = []

    def make(fns: list[Callable[..., Any]], workers: int = 2) -> WorkerPool:
        pool = WorkerPool(fns, workers=workers, tag=f"t{secrets.token_hex(3)}")
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
        assert live_workers(pool.process_name) == []


@needs_fork
def test_results_in_call_order_from_lazily_started_reused_named_workers(make_pool: Callable) -> None:
    offset = 5
    pool = make_pool([double, lambda x: x + offset, time.sleep])  # a closure: fork, not pickle
    assert pool.pids() == [] and live_workers(pool.process_name) == []
    calls = [Call(i % 2, (i,)) for i in range(50)] + [Call(2, (0.3,))]
    results = pool.run(calls, 1.5)
    assert results[:50] == [CallResult(2 * i if i % 2 == 0 else i + offset) for i in range(50)]
    assert results[50] == CallResult(None)  # 0.3 s of a 1.5 s deadline: not killed early
    pids = pool.pids()
    assert len(pids) == 2 and live_workers(pool.process_name) == sorted(pids)
    pgrep = subprocess.run(["pgrep", "-x", pool.process_name], capture_output=True, text=True)
    assert sorted(int(p) for p in pgrep.stdout.split()) == sorted(pids)
    assert pool.run([Call(0, (21,))], 1.0) == [CallResult(42)]
    assert pool.pids() == pids
    assert pool.run([], 1.0) == []


@needs_fork
def test_exceptions_are_raised_failures_and_the_worker_carries_on(make_pool: Callable) -> None:
    pool = make_pool([double, raises, lambda: lambda: 1], workers=1)
    pool.run([Call(0, (1,))], 1.0)
    pids = pool.pids()
    kinds = ["value", "exit", "interrupt"]
    results = pool.run([Call(1, (k,)) for k in kinds] + [Call(2), Call(0, (lambda: 1,)), Call(0, (4,))], 2.0)
    assert [r.failure for r in results] == ["raised"] * 5 + [None]
    assert results[0].detail.startswith("ValueError('bad') at ") and "in raises" in results[0].detail
    assert results[1].detail.startswith("SystemExit(3)")
    assert results[2].detail.startswith("KeyboardInterrupt()")
    assert "result (function) cannot be pickled" in results[3].detail
    assert "arguments cannot be pickled" in results[4].detail
    assert results[5].value == 8
    assert pool.pids() == pids


@needs_fork
def test_a_worker_that_dies_crashes_its_call_and_the_rest_rerun(make_pool: Callable) -> None:
    pool = make_pool([double, os._exit, segfault], workers=1)
    calls = [Call(0, (i,)) for i in range(12)]
    calls[3], calls[8] = Call(1, (3,)), Call(2)
    results = pool.run(calls, 2.0)
    assert results[3] == CallResult(failure="crashed", detail="its worker exited with code 3")
    assert results[8] == CallResult(failure="crashed", detail="its worker died of SIGSEGV")
    assert [r.value for i, r in enumerate(results) if i not in (3, 8)] == [
        2 * i for i in range(12) if i not in (3, 8)
    ]
    assert len(pool.pids()) == 1


@needs_fork
@pytest.mark.parametrize("hang", [stuck_in_c, ignores_sigterm_and_exceptions, sleeps])
@pytest.mark.parametrize(("k", "timeout_s"), [(1, 1.0), (3, 2.0)])
def test_hung_calls_cost_at_most_ceil_k_over_w_deadlines(
    make_pool: Callable, hang: Callable[[], None], k: int, timeout_s: float
) -> None:
    pool = make_pool([double, hang], workers=2)
    normal = [Call(0, (i,)) for i in range(40)]
    pool.run(normal, timeout_s)  # forks the workers
    t0 = time.monotonic()
    pool.run(normal, timeout_s)
    plain_s = time.monotonic() - t0
    # The hung calls first, in the same chunk: the calls queued behind them must move to another worker.
    t0 = time.monotonic()
    results = pool.run([Call(1)] * k + normal, timeout_s)
    extra_s = time.monotonic() - t0 - plain_s
    assert [r.failure for r in results[:k]] == ["timeout"] * k
    assert results[k:] == [CallResult(2 * i) for i in range(40)]
    assert extra_s <= math.ceil(k / 2) * timeout_s + 2.0
    assert len(pool.pids()) == 2


@needs_fork
def test_calls_behind_a_hung_call_run_on_another_worker(make_pool: Callable) -> None:
    # Two hung calls in one chunk: run one after the other they would take 2 × 3 s > the bound of 3 + 2 s.
    pool = make_pool([double, sleeps], workers=2)
    pool.run([Call(0, (0,))], 1.0)
    t0 = time.monotonic()
    results = pool.run([Call(1), Call(1)] + [Call(0, (i,)) for i in range(40)], 3.0)
    assert time.monotonic() - t0 <= 3.0 + 2.0
    assert [r.failure for r in results] == ["timeout", "timeout"] + [None] * 40


@needs_fork
def test_calls_and_results_travel_in_chunks(make_pool: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = make_pool([double], workers=2)
    pool.run([Call(0, (0,))], 1.0)  # forks the workers before the parent's Connection is patched
    sent, received = [], []
    send_bytes, recv_bytes = Connection.send_bytes, Connection.recv_bytes

    def counting_send(self: Connection, buf: bytes) -> None:
        sent.append(len(buf))
        send_bytes(self, buf)

    def counting_recv(self: Connection) -> bytes:
        received.append(1)
        return recv_bytes(self)

    monkeypatch.setattr(Connection, "send_bytes", counting_send)
    monkeypatch.setattr(Connection, "recv_bytes", counting_recv)
    assert pool.run([Call(0, (i,)) for i in range(256)], 5.0) == [CallResult(2 * i) for i in range(256)]
    # 8 chunks of 32 (a few more when an idle worker takes over the end of another's), one message back each
    # unless a chunk takes over 10 ms: not one message per call.
    assert 0 < len(sent) <= 32 and 0 < len(received) <= 64


@needs_fork
def test_workers_ignore_sigint(make_pool: Callable) -> None:
    # A test run started in the background of a non-interactive shell ignores SIGINT already: fork the
    # worker from a process where Ctrl-C would interrupt, or the test could not fail
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        pool = make_pool([time.sleep], workers=1)
        pool.run([Call(0, (0,))], 1.0)
    finally:
        signal.signal(signal.SIGINT, previous)
    (pid,) = pool.pids()
    timer = threading.Timer(0.3, os.kill, (pid, signal.SIGINT))
    timer.start()
    assert pool.run([Call(0, (1.0,))], 5.0) == [CallResult(None)]  # a KeyboardInterrupt would be "raised"
    timer.join()
    assert pool.pids() == [pid]


@needs_fork
def test_keyboard_interrupt_propagates_and_leaves_no_worker(make_pool: Callable) -> None:
    pool = make_pool([time.sleep, double], workers=2)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.run([Call(0, (1000,))] * 4, 30.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert live_workers(pool.process_name) == []
    assert pool.run([Call(1, (2,))], 1.0) == [CallResult(4)]  # fresh workers
    pool.close()
    assert live_workers(pool.process_name) == []


@needs_fork
def test_close_kills_every_worker_and_is_idempotent() -> None:
    with WorkerPool([sleeps, double], workers=2, tag=f"c{secrets.token_hex(3)}") as pool:
        name = pool.process_name
        assert pool.run([Call(1, (1,))], 1.0) == [CallResult(2)]
        # the worker that ran no call may not have named itself yet
        assert wait_until(lambda: len(live_workers(name)) == 2, 5.0)
    assert live_workers(name) == []
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run([Call(1, (1,))], 1.0)


SCRIPT = """
import signal, sys, time
from rltk.workers import Call, WorkerPool

def ignore_sigterm():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

pool = WorkerPool([time.sleep, ignore_sigterm], workers=2, tag=sys.argv[1])
if sys.argv[2] == "hang":
    pool.run([Call(0, (1000,))] * 2, 1000.0)
pool.run([Call(1)] * 2, 10.0)  # then exit without close(): a worker left alive would keep this process
"""


@needs_fork
@pytest.mark.parametrize("end", ["parent SIGKILLed", "exit without close"])
def test_no_orphan_when_the_parent_ends(end: str) -> None:
    tag = f"o{secrets.token_hex(3)}"
    name = f"rltk-rw-{tag}"
    mode = "hang" if end == "parent SIGKILLed" else "exit"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, tag, mode], cwd=ROOT)
    try:
        if mode == "hang":
            assert wait_until(lambda: len(live_workers(name)) == 2, 20.0)
            proc.kill()
        assert proc.wait(timeout=20.0) == (-signal.SIGKILL if mode == "hang" else 0)
        assert wait_until(lambda: live_workers(name) == [], 2.0), live_workers(name)
    finally:
        proc.kill()
        proc.wait()
        for pid in live_workers(name):
            os.kill(pid, signal.SIGKILL)


@needs_fork
def test_no_fd_or_process_leak_over_many_worker_replacements(make_pool: Callable) -> None:
    pool = make_pool([double, sleeps], workers=2)
    calls = [Call(1)] + [Call(0, (i,)) for i in range(6)]
    pool.run(calls, 0.05)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        assert pool.run(calls, 0.05)[0].failure == "timeout"
    assert len(os.listdir("/proc/self/fd")) == fds
    # its own children only: pools of earlier tests in this process may still be exiting
    named = {int(p) for p in children() if _comm(p) == pool.process_name}  # a fresh fork may not be named yet
    assert len(pool.pids()) == 2 and named <= set(pool.pids()) <= {int(p) for p in children()}


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:  # exited meanwhile
        return ""


def test_without_fork_calls_run_here_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(workers, "USE_PROCESSES", False)
    workers._warn_in_process.cache_clear()
    pool = WorkerPool([double, raises], workers=2, tag="inline")
    with caplog.at_level(logging.WARNING, logger="rltk.workers"):
        assert pool.run([Call(0, (3,))], 1.0) == [CallResult(6)]
        (result,) = pool.run([Call(1, ("value",))], 1.0)
    assert result.failure == "raised" and result.detail.startswith("ValueError('bad')")
    assert [r.message for r in caplog.records] == [
        "no fork on this platform: calls run in this process, one by one, with no deadline"
    ]
    assert pool.pids() == []
    with pytest.raises(KeyboardInterrupt):
        pool.run([Call(1, ("interrupt",))], 1.0)
    pool.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="workers >= 1"):
        WorkerPool([double], workers=0)
    with pytest.raises(ValueError, match="tag"):
        WorkerPool([double], tag="a b")
    pool = WorkerPool([double], tag="args")
    with pytest.raises(ValueError, match="timeout_s"):
        pool.run([Call(0, (1,))], 0.0)
    with pytest.raises(ValueError, match=r"functions \[1\]"):
        pool.run([Call(1, (1,))], 1.0)
    assert pool.pids() == []
    pool.close()
