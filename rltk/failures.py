"""Failure accounting: when what went wrong in a step stops the run.

Two guards, one per kind of fault that must never reach the weights.

A failed rollout (:class:`rltk.batch.Failure`) leaves the update and its group's baseline, so what is
trained is the reward *given no failure*: a policy could learn to push its hard cases into crashes. The
:class:`FailureGuard` bounds that: a source (a reward, or the env) failing on more than a quarter of one
step's rollouts, or on more than ``rollout.max_reward_error_rate`` of a window of recent rollouts (3
failures at least), stops the run with a :class:`~rltk.reward.RewardError` naming the source, the kind of
failure and one offending sample. Counts come in summed over ranks, so every rank decides alike.

A non-finite loss or gradient norm skips the optimizer step (weights and optimizer state stay as they were);
:class:`NonFiniteGuard` counts such steps and stops the run after ``MAX_NONFINITE_STREAK`` in a row, as
torchtitan does. The trainer all-reduces the finiteness verdict first, so every rank skips alike.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Mapping, Sequence

from rltk.batch import Failure
from rltk.reward import RewardError

STEP_MAX_FAILURE_RATE = 0.25
"""A source failing on more than this share of one step's rollouts stops the run at once."""

MIN_WINDOW_FAILURES = 3
"""The windowed rate stops the run only from this many failures on (one bad sample early is not a rate)."""


class FailureGuard:
    """Stop the run when a reward (or the env) fails too often: dropping failures would be training on them.

    Args:
        max_rate: Highest failure share allowed over the window (``rollout.max_reward_error_rate``).
        window: How many recent rollouts the rate is taken over (``rollout.reward_error_window``).

    >>> guard = FailureGuard(max_rate=0.02, window=100)
    >>> guard.check(64, {"fmt": 2}, [])  # 2 of 64: fewer than 3 failures
    >>> guard.check(64, {"fmt": 2}, [])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rltk.reward.RewardError: reward 'fmt' failed on 4 of 128 rollouts (3.1% > rollout.max_reward_error_rate...

    """

    def __init__(self, max_rate: float, window: int) -> None:
        self.max_rate = float(max_rate)
        self.window = int(window)
        self._steps: deque[tuple[int, Mapping[str, int]]] = deque()

    def check(self, n: int, failed: Mapping[str, int], examples: Sequence[tuple[Failure, str]]) -> None:
        """Record one step (``n`` rollouts, ``failed[source]`` of them failed) and raise past the limits.

        Args:
            n: Rollouts this step (all ranks).
            failed: Per source (reward name or ``"env"``): rollouts it failed on this step (all ranks).
            examples: ``(failure, completion)`` pairs seen on this rank, to quote one in the error.

        Raises:
            RewardError: A source failed on more than ``STEP_MAX_FAILURE_RATE`` of this step's rollouts, or
                on ``MIN_WINDOW_FAILURES`` or more and more than ``max_rate`` of the window's.

        """
        self._steps.append((n, dict(failed)))
        total = sum(k for k, _ in self._steps)
        while len(self._steps) > 1 and total - self._steps[0][0] >= self.window:  # keep >= window rollouts
            total -= self._steps.popleft()[0]
        for source, k in failed.items():
            if k > STEP_MAX_FAILURE_RATE * n:
                limit = f"{100 * STEP_MAX_FAILURE_RATE:g}% of one step's rollouts"
                raise RewardError(self._message(source, k, n, limit, examples))
            in_window = sum(f.get(source, 0) for _, f in self._steps)
            if in_window >= MIN_WINDOW_FAILURES and in_window > self.max_rate * total:
                limit = f"rollout.max_reward_error_rate over the last {total} rollouts"
                raise RewardError(self._message(source, in_window, total, limit, examples))

    def _message(
        self, source: str, k: int, n: int, limit: str, examples: Sequence[tuple[Failure, str]]
    ) -> str:
        what = "the env (an episode step or check)" if source == "env" else f"reward '{source}'"
        mine = [(f, c) for f, c in examples if f.source == source]
        kinds = dict(Counter(f.kind for f, _ in mine))
        example = ""
        if mine:
            first, completion = mine[0]
            example = f" On this rank: {kinds}; e.g. {first.kind}: {first.detail}, on {completion[:300]!r}."
        fix = (
            "fix the env's step/check: it must not raise or hang on any model output"
            if source == "env"
            else "fix the reward: it must return a finite float within its declared range, or None for "
            "'not applicable'"
        )
        return (
            f"{what} failed on {k} of {n} rollouts ({100 * k / n:.1f}% > {limit}).{example} Failed "
            "rollouts leave the update, so training on would optimise the reward given no failure (a "
            f"policy can learn to make it fail): {fix}; or raise rollout.max_reward_error_rate (now "
            f"{self.max_rate:g})."
        )


MAX_NONFINITE_STREAK = 3
"""Optimizer steps in a row with a non-finite loss or gradient norm that stop the run."""


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm: training diverged."""


class NonFiniteGuard:
    """Skip optimizer steps whose loss or gradient norm is not finite; stop after a streak of them.

    >>> guard = NonFiniteGuard()
    >>> guard.check(1, finite=False), guard.check(2, finite=True), guard.skipped
    (False, True, 1)
    >>> guard.check(3, False), guard.check(4, False)
    (False, False)
    >>> guard.check(5, False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rltk.failures.NonFiniteError: non-finite loss or gradient norm at steps 3, 4, 5 in a row...

    """

    def __init__(self, limit: int = MAX_NONFINITE_STREAK) -> None:
        self.limit = limit
        self.skipped = 0
        self._streak: list[int] = []

    def check(self, step: int, finite: bool) -> bool:
        """Record the optimizer step of RL step ``step``: True = apply it, False = skip it.

        Raises:
            NonFiniteError: This is the ``limit``-th non-finite step in a row; it names the steps.

        """
        if finite:
            self._streak.clear()
            return True
        self.skipped += 1
        self._streak.append(step)
        if len(self._streak) >= self.limit:
            steps = ", ".join(map(str, self._streak))
            raise NonFiniteError(
                f"non-finite loss or gradient norm at steps {steps} in a row: training diverged, stopped at "
                f"step {step}. Every one of those steps was skipped, so the weights and the checkpoints hold "
                "no NaN. Fix: lower optim.lr or optim.max_grad_norm, check the rewards' scale, then resume "
                "from the last checkpoint (or start anew)."
            )
        return False
