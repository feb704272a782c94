"""Stage "metrics": per-step metrics to ``<run_dir>/metrics.jsonl`` (always), wandb (optional), progress bar.

On-disk format: ``metrics.jsonl`` holds one JSON object per :meth:`MetricsLogger.log` call, e.g.
``{"step": 12, "time": 1718000000.1, "reward/mean": 0.41, "loss": 0.02}``: ``step`` (int), ``time`` (unix
seconds) and the metrics, tensors and numpy scalars turned into numbers, NaN/inf written as ``null``. Every
line is flushed and fsynced, so a kill loses at most the line being written; that torn last line (no
trailing newline) is dropped when a logger opens the file again. On resume the trainer calls
:meth:`MetricsLogger.truncate_after` with the restored step so the file holds no steps that will be redone.

Only the main process writes; other ranks get a logger whose methods do nothing. :func:`outcome_metrics`
turns one step's groups into the env-outcome numbers (accuracy, answer shares, turns) that get logged.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from rltk.durable import fsync_dir

if TYPE_CHECKING:
    from rltk.batch import Group

REPORTERS = ("jsonl", "wandb")
# Progress bar stats: (keyword, key in the trainer's metrics, format)
_PROGRESS_FIELDS = (
    ("reward", "reward/mean", "reward {:.3f}"),
    ("accuracy", "accuracy", "acc {:.1%}"),
    ("step_time", "time/step_s", "{:.2f} s/step"),
    ("tokens_per_s", "tokens/per_s", "{:,.0f} tok/s"),
)


class MetricsError(RuntimeError):
    """Metrics cannot be reported as configured; the message names the fix."""


def _number(value: Any) -> Any:
    """Turn tensors / numpy values into Python numbers (or lists) and non-finite floats into None."""
    if hasattr(value, "item") and hasattr(value, "tolist"):
        try:
            value = value.item()
        except (ValueError, RuntimeError):  # more than one element
            return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that has no trailing newline (a write killed halfway)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        os.fsync(f.fileno())


def _init_wandb(run_dir: Path, config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise MetricsError(
            "run.report_to includes 'wandb' but wandb is not installed. Install it with `pip install wandb` "
            "(or `pip install 'rltk[wandb]'`), or remove 'wandb' from run.report_to."
        ) from exc
    project = os.environ.get("WANDB_PROJECT", "rltk")
    mode = os.environ.get("WANDB_MODE", "offline")  # offline unless the user opted in to syncing
    return wandb.init(project=project, dir=str(run_dir), config=config, mode=mode)


class MetricsLogger:
    """Append per-step metrics to ``metrics.jsonl`` and, if asked, to wandb.

    Args:
        run_dir: The run's output directory.
        report_to: Reporters: ``"jsonl"`` (always on, listing it is optional) and/or ``"wandb"``.
        config: The run's config as a plain dict (sent to wandb).
        is_main_process: Non-main ranks log nothing.
        rank: This process's rank (kept for messages).

    """

    def __init__(
        self,
        run_dir: str | Path,
        report_to: list[str],
        config: dict[str, Any],
        is_main_process: bool = True,
        rank: int = 0,
    ) -> None:
        unknown = [r for r in report_to if r not in REPORTERS]
        if unknown:
            raise MetricsError(f"unknown run.report_to entries {unknown}; valid ones are {list(REPORTERS)}")
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rank = rank
        self.active = is_main_process
        self._file: Any = None
        self._wandb: Any = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open across log calls)
        if "wandb" in report_to:
            self._wandb = _init_wandb(self.path.parent, config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one line ``{"step", "time", **metrics}`` (fsynced) and send ``metrics`` to wandb."""
        if not self.active:
            return
        record: dict[str, Any] = {"step": step, "time": time.time()}
        record.update((k, _number(v)) for k, v in metrics.items() if k not in record)
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=step)

    def truncate_after(self, step: int, until: float | None = None) -> None:
        """Drop lines past ``step`` (and torn or unreadable ones), atomically (temp + rename).

        Args:
            step: The last step to keep (-1 keeps nothing: a run starting anew).
            until: If given, lines of ``step`` itself logged after this unix time are dropped too (what a
                resumed run logs again after its checkpoint's ``saved_at``).

        """
        if not self.active:
            return
        self._file.close()
        kept = []
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line) if line.endswith(b"\n") else None
                except ValueError:
                    record = None
                if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                    continue
                late = until is not None and record["step"] == step and record.get("time", 0.0) > until
                if record["step"] <= step and not late:
                    kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open across log calls)

    def close(self) -> None:
        """Close the file and finish the wandb run (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def outcome_metrics(groups: list[Group]) -> dict[str, float]:
    """Accuracy, answer shares and completion stats from the env's outcomes.

    ``answer_share/<answer>`` is the fraction of samples per answer class (the verdict's ``"answer"``, for
    envs that give one; ``None`` = unparseable): the number to watch for a drift of the answer prior.
    """
    rollouts = [r for g in groups for r in g.rollouts]
    correct = [float(bool(r.outcome.get("correct"))) for r in rollouts if "correct" in r.outcome]
    scored = [r.reward for r in rollouts if not r.failed]  # a failed rollout's reward is NaN: no score
    m: dict[str, float] = {"reward/mean": float(np.mean(scored)) if scored else 0.0}
    if correct:
        m["accuracy"] = float(np.mean(correct))
    answers = [str(r.outcome["answer"]) for r in rollouts if "answer" in r.outcome]
    for a in sorted(set(answers)):
        m[f"answer_share/{a}"] = answers.count(a) / len(answers)
    m["truncated_frac"] = float(np.mean([r.truncated for r in rollouts])) if rollouts else 0.0
    if rollouts:
        m["rollout/turns_mean"] = float(np.mean([len(r.turns) for r in rollouts]))
        for reason in ("max_turns", "max_tokens", "env_failed"):  # rollouts a limit (or the env) ended
            m[f"rollout/stopped_{reason}"] = float(np.mean([r.stop_reason == reason for r in rollouts]))
    return m


class Progress:
    """A one-line progress bar on stderr: step/total, reward, accuracy, step time and tokens/s.

    It is off when stderr is not a TTY (CI, log files), when ``RLTK_NO_PROGRESS=1``, or when
    ``enabled=False`` (pass ``enabled=is_main_process``); then every method does nothing.

    Args:
        total: The number of steps.
        start: The step the run starts from (after a resume).
        enabled: Whether this process may show a bar at all.

    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty() and os.environ.get("RLTK_NO_PROGRESS") != "1"
        self._bar: Any = None
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task = self._bar.add_task("rl", total=total, completed=start, stats="")
        self._bar.start()

    def update(
        self,
        step: int,
        metrics: Mapping[str, Any] | None = None,
        *,
        reward: float | None = None,
        accuracy: float | None = None,
        step_time: float | None = None,
        tokens_per_s: float | None = None,
    ) -> None:
        """Show ``step`` as done, with stats from the keywords, else from the trainer's ``metrics`` dict.

        ``metrics`` keys read: ``reward/mean``, ``accuracy``, ``time/step_s``, ``tokens/per_s``; missing
        stats are left out.
        """
        if self._bar is None:
            return
        given = {"reward": reward, "accuracy": accuracy, "step_time": step_time, "tokens_per_s": tokens_per_s}
        parts = []
        for name, key, fmt in _PROGRESS_FIELDS:
            value = given[name] if given[name] is not None else (metrics or {}).get(key)
            if value is not None:
                parts.append(fmt.format(float(value)))
        self._bar.update(self._task, completed=step, stats=" · ".join(parts))

    def close(self) -> None:
        """Stop the bar (idempotent)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
