"""Progress of a long evaluation: a live bar on a terminal, plain lines otherwise (logs, CI, nohup).

Training steps have their own bar (:class:`rltk.metrics.Progress`, with reward and speed); this one counts
the tasks of an evaluation stage, and also reports where nobody watches a terminal, since a report's stages
run for minutes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO


class Progress:
    """Counts the done items of one stage: a rich bar on a terminal, else a line per ~10% and at the end.

    Args:
        label: What is counted, e.g. ``"rl: 8 samples x 200 tasks"``.
        total: Items in all.
        stream: Where to write (default stderr). ``RLTK_NO_PROGRESS=1`` gives plain lines on a terminal too.

    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self._next_line = 0
        self._bar: Any = None
        if self.stream.isatty() and os.environ.get("RLTK_NO_PROGRESS") != "1":
            from rich.console import Console
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(console=Console(file=self.stream))
            self._task = self._bar.add_task(label, total=total)
            self._bar.start()

    def update(self, n: int) -> None:
        """Add ``n`` finished items."""
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif self.done >= self._next_line or self.done >= self.total:
            elapsed = time.perf_counter() - self.t0
            print(f"[{self.label}] {self.done}/{self.total}  {elapsed:.0f} s", file=self.stream, flush=True)
            self._next_line = self.done + max(1, self.total // 10)

    def close(self) -> None:
        """End the bar."""
        if self._bar is not None:
            self._bar.stop()
