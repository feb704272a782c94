"""The run dir: one writer at a time, and where a run resumes from, never hiding damage.

:class:`RunDirLock` takes an exclusive ``fcntl.flock`` on ``<run_dir>/.lock`` for as long as a run writes
there. The kernel drops it when the holder dies (``kill -9`` included), so no stale lock outlives its
process; a second ``rltk train`` on a live run dir fails at once, naming the holder's PID and host.

:func:`resume_point` picks the newest valid checkpoint. A run dir whose checkpoints are *all* damaged
(a manifest whose files no longer match) is an error naming each damaged file: starting again from step 0
would overwrite them and hide the damage. A step dir without a manifest is a save that was killed before it
finished (:mod:`rltk.checkpoint`), not damage: the run starts as if it were absent.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
from pathlib import Path

from rltk.checkpoint import MANIFEST, CheckpointError, step_dirs, verify

LOCK_NAME = ".lock"


class RunDirBusyError(RuntimeError):
    """Another live process holds the run dir's lock."""


class RunDirLock:
    """An exclusive lock on a run dir, held until :meth:`release` or the process's death.

    Args:
        run_dir: The run's output directory (created if missing).

    Raises:
        RunDirBusyError: Another process holds it; the message names its PID and host.

    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = self.path.read_text().strip() or "an unknown process"
            self.release()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise RunDirBusyError(
                f"run dir {self.path.parent} is in use by {holder}: two runs writing one dir would mix their "
                "checkpoints and metrics. Wait for that run to end (or stop it), or choose another "
                "run.output_dir"
            ) from None
        since = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"PID {os.getpid()} on host {socket.gethostname()} (since {since})\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (idempotent); the file stays, holding the last holder's line."""
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


def resume_point(run_dir: str | Path) -> Path | None:
    """The newest valid checkpoint of ``run_dir``; ``None`` when it has none at all (a fresh run).

    Raises:
        CheckpointError: It has checkpoints with a manifest and none of them is valid; the message names
            each damaged file and the fixes.

    """
    damaged: list[str] = []
    for _, path in step_dirs(Path(run_dir) / "checkpoints"):
        if not (path / MANIFEST).is_file():
            continue  # a save killed before its manifest: not a checkpoint
        problems = verify(path)
        if not problems:
            return path
        damaged += [f"{path}: {p}" for p in problems]
    if damaged:
        listing = "".join(f"\n  - {d}" for d in damaged)
        raise CheckpointError(
            f"every checkpoint of {run_dir} is damaged, so the run cannot resume:{listing}\nNothing was "
            "changed. Fix: restore the damaged files (from a backup or a copy of the run dir), or start anew "
            "with a new run.output_dir, or with run.resume=never (which trains from step 0 and overwrites "
            "them)."
        )
    return None
