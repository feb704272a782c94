"""A progress bar for long evaluations: a live bar on a terminal, plain lines otherwise (logs, CI, nohup)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    """Counts done items of one stage; on a terminal a tqdm bar, else a line per ~10% (and at the end).

    Args:
        label: What is counted, e.g. ``"rl: sampled 8 x 200 tasks"``.
        total: Items in all.
        stream: Where to write (default stderr).

    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self._bar = tqdm(total=total, desc=label, file=self.stream) if self.stream.isatty() else None
        self._next_line = 0

    def update(self, n: int) -> None:
        """Add ``n`` finished items."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.done >= self._next_line or self.done >= self.total:
            elapsed = time.perf_counter() - self.t0
            print(f"[{self.label}] {self.done}/{self.total}  {elapsed:.0f} s", file=self.stream, flush=True)
            self._next_line = self.done + max(1, self.total // 10)

    def close(self) -> None:
        """End the bar."""
        if self._bar is not None:
            self._bar.close()
