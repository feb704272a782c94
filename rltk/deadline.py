"""In-process deadlines for calls into user code (a reward with ``isolated: false``, an env's step or check).

:func:`call_with_timeout` arms ``SIGALRM`` (``signal.setitimer(ITIMER_REAL)``) around one call and raises
:class:`CallTimeout` when it runs past its deadline. The alarm raises a ``BaseException`` inside the call,
so user code's ``except Exception`` cannot swallow it. It works only on the main thread of a POSIX process
(elsewhere the call runs unguarded), and it interrupts Python code only: a call stuck inside C code returns
to Python first. Reward calls therefore run in worker processes that are killed at the deadline
(:mod:`rltk.workers`); this module guards what must run in the trainer.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class CallTimeout(TimeoutError):
    """A guarded call ran past its deadline."""


class _Alarm(BaseException):
    """Raised by the SIGALRM handler: a BaseException, so user code's ``except Exception`` cannot catch it."""


def can_alarm() -> bool:
    """Whether :func:`call_with_timeout` can enforce its deadline here (POSIX, main thread)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def call_with_timeout(
    fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], timeout_s: float
) -> Any:
    """Call ``fn(*args, **kwargs)``; raise :class:`CallTimeout` after ``timeout_s`` (main thread only).

    Off the main thread (or without ``setitimer``) the call runs unguarded. An outer ``ITIMER_REAL`` timer
    (e.g. a test timeout) is suspended during the call and restored afterwards, less the time spent here
    (if it fell due meanwhile, it fires right after).

    >>> call_with_timeout(sum, ([1, 2],), {}, timeout_s=1.0)
    3
    """
    if not can_alarm():
        return fn(*args, **kwargs)

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Alarm

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    prev_delay, prev_interval = 0.0, 0.0
    try:
        prev_delay, prev_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Alarm:
        raise CallTimeout(f"took longer than {timeout_s:g} s") from None
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if prev_delay > 0:
            left = max(prev_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, prev_interval)
