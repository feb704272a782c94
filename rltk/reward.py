"""Stage 2, reward: score every rollout with a weighted rubric of reward functions, safely.

    groups ──▶ Rubric.score ──▶ rollout.scores[name] (float | None), rollout.reward (weighted sum), metrics
                          └──▶ rollout.failures (a reward bug) ──▶ FailureGuard (stop past the allowed rate)

A reward is a plain function ``fn(completion, reference, outcome, **params) -> float | None`` decorated with
:func:`reward_fn`, which records its range (a fixed pair, or a function of the params). ``completion`` is the
final assistant turn, ``reference`` the task's gold data, ``outcome`` the env's verdict. ``None`` means "not
applicable to this task" (decided by the task) and is left out of the weighted sum and of the reward's
mean/std.

Rewards are user code run on untrusted model output. Each call runs in a worker process with a hard
deadline (:mod:`rltk.workers`; ``isolated: false`` runs a cheap pure reward in the trainer under a SIGALRM
deadline instead, :mod:`rltk.deadline`). A call that raises, times out, crashes its worker, or returns
anything but ``None`` or a finite real within the range declared for its params (:func:`as_score`) is a
**reward bug, not a score**: the rollout gets a :class:`~rltk.batch.Failure`, its ``reward`` is NaN, and it
leaves the update and its group's baseline (advantage.py, batch.py). Scoring it 0 instead would train on the
bug: for a reward in (−1, 0) a crash would score the best value. Dropping failures optimises the reward
*given no failure*, so :class:`FailureGuard` stops the run when they pass ``rollout.max_reward_error_rate``
over recent rollouts, or a quarter of one step's.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, get_args

import numpy as np

from rltk import plugins
from rltk.batch import Failure, FailureKind
from rltk.deadline import CallTimeout, call_with_timeout, can_alarm
from rltk.workers import Call, CallResult, WorkerPool

if TYPE_CHECKING:
    from rltk.batch import Group, Rollout
    from rltk.env import Env

logger = logging.getLogger(__name__)


class RewardFn(Protocol):
    """The reward contract (``reward_range`` is set by :func:`reward_fn`)."""

    def __call__(
        self, completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any], /, **params: Any
    ) -> float | None:
        """Score one completion; ``None`` = not applicable to this task."""


class RewardError(RuntimeError):
    """Rewards failed on too many rollouts, or a rubric is misconfigured."""


F = TypeVar("F", bound=Callable[..., Any])
Range = tuple[float, float]


def _check_range(value: Any) -> Range:
    lo, hi = (float(x) for x in value)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"reward range must be finite (lo, hi) with lo <= hi, got {value!r}")
    return lo, hi


def reward_fn(range: Range | Callable[..., Range]) -> Callable[[F], F]:
    """Mark a function as a reward with its score range; otherwise a no-op.

    A parse failure of the model's output should score the range minimum. Where the range depends on the
    reward's params (a cost), pass a function of those params: it is called with every param after
    ``(completion, reference, outcome)``, defaults filled in, and returns ``(lo, hi)``. Scores outside the
    range declared for the call's params are reward bugs (:func:`as_score`).

    Args:
        range: ``(lo, hi)`` with ``lo <= hi``, both finite; or ``fn(**params) -> (lo, hi)``.

    Returns:
        A decorator that sets ``fn.reward_range`` (the range at the default params) and returns ``fn``.

    >>> @reward_fn(range=(0.0, 1.0))
    ... def exact(completion, reference, outcome):
    ...     return float(completion == reference["answer"])
    >>> exact.reward_range
    (0.0, 1.0)
    >>> @reward_fn(range=lambda cost: (-cost, 1.0))
    ... def decision(completion, reference, outcome, cost=2.0):
    ...     return 1.0 if completion == reference["answer"] else -cost
    >>> decision.reward_range, declared_range(decision, {"cost": 5.0})
    ((-2.0, 1.0), (-5.0, 1.0))

    """
    spec = range if callable(range) else _check_range(range)

    def mark(fn: F) -> F:
        fn.reward_range_of = spec  # type: ignore[attr-defined]
        fn.reward_range = declared_range(fn, {})  # type: ignore[attr-defined]
        return fn

    return mark


def declared_range(fn: Callable[..., Any], params: Mapping[str, Any]) -> Range | None:
    """The range ``fn`` declares for ``params`` (see :func:`reward_fn`); ``None`` if it declares none.

    Raises:
        ValueError: The range function rejects the params, or returns no finite ``(lo, hi)``.

    """
    spec = getattr(fn, "reward_range_of", None) or getattr(fn, "reward_range", None)
    if spec is None or not callable(spec):
        return None if spec is None else _check_range(spec)
    bound = inspect.signature(fn).bind_partial("", {}, {}, **params)
    bound.apply_defaults()
    named = dict(list(bound.arguments.items())[3:])
    extra = next(
        (named.pop(p.name) for p in bound.signature.parameters.values() if p.kind == p.VAR_KEYWORD), {}
    )
    try:
        return _check_range(spec(**named, **extra))
    except (TypeError, ValueError) as e:
        raise ValueError(f"its declared range does not hold for params {dict(params)}: {e}") from None


@dataclass
class RubricItem:
    """One reward of a rubric.

    Attributes:
        name: Key in ``rollout.scores`` and in the metrics (``reward/<name>/...``).
        fn: The reward function.
        weight: Its weight in ``rollout.reward``.
        params: Keyword arguments passed on every call (validated against ``fn``'s signature).
        isolated: Run in a worker process with a hard deadline (default). ``False`` runs it in the trainer
            under a SIGALRM deadline, which cannot stop a call stuck in C code: only for cheap pure rewards
            (``benchmarks/reward_ipc.py`` measures what the worker costs).
        range: The range ``fn`` declares for ``params`` (``None``: undeclared), set on construction.

    """

    name: str
    fn: Callable[..., float | None]
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    isolated: bool = True
    range: Range | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"reward '{self.name}': weight must be finite, got {self.weight!r}")
        self.weight = float(self.weight)
        self.params = dict(self.params)
        check_params(self.name, self.fn, self.params)
        try:
            self.range = declared_range(self.fn, self.params)
        except ValueError as e:
            raise ValueError(f"reward '{self.name}': {e}") from None


def check_params(name: str, fn: Callable[..., Any], params: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the reward and its valid params if ``fn`` cannot take ``params``.

    >>> def r(completion, reference, outcome, scale=1.0):
    ...     return scale
    >>> check_params("r", r, {"scael": 2.0})
    Traceback (most recent call last):
    ...
    ValueError: reward 'r' has no param 'scael' (did you mean 'scale'?); valid params: scale
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins, some C callables: nothing to check
        return
    ps = list(sig.parameters.values())
    valid = [p.name for p in ps[3:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    try:
        sig.bind_partial("", {}, {})
    except TypeError as e:
        raise ValueError(f"reward '{name}' must accept (completion, reference, outcome): {e}") from None
    try:
        sig.bind_partial("", {}, {}, **params)
    except TypeError:
        bad = [k for k in params if k not in valid] or sorted(params)
        hint = difflib.get_close_matches(bad[0], valid, n=1)
        did = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ValueError(
            f"reward '{name}' has no param '{bad[0]}'{did}; valid params: {', '.join(valid) or '(none)'}"
        ) from None


RANGE_TOL = 1e-6
"""A score may pass its declared range by this much, relative to the range's width (at least 1): rounding."""

UNDECLARED_LIMIT = 1e6
"""A reward without a declared range must score within ``±UNDECLARED_LIMIT`` (beyond it, float32 statistics
of a group overflow); declare the range with :func:`reward_fn` to check it exactly."""


class InvalidScore(ValueError):
    """A reward returned something that is not a score: not a finite real, or outside its declared range."""


def as_score(value: Any, declared: Range | None) -> float | None:
    """Check a reward's return value: ``None`` (not applicable) or a finite real within ``declared``.

    ``int``, ``float`` and numpy integer/floating scalars are scores; ``bool`` is not (``True`` is not a
    number a reward means), nor is anything else.

    Raises:
        InvalidScore: Naming the value and what was expected.

    >>> as_score(1, (0.0, 1.0)), as_score(None, (0.0, 1.0))
    (1.0, None)
    >>> as_score(7.0, (0.0, 1.0))
    Traceback (most recent call last):
    ...
    rltk.reward.InvalidScore: returned 7.0, outside its declared range (0.0, 1.0)
    >>> as_score(True, None)
    Traceback (most recent call last):
    ...
    rltk.reward.InvalidScore: returned True (bool); a reward returns a finite float or None

    """
    if value is None:
        return None
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    if not real:
        raise InvalidScore(
            f"returned {value!r} ({type(value).__name__}); a reward returns a finite float or None"
        )
    score = float(value)
    if not math.isfinite(score):
        raise InvalidScore(f"returned {value!r}; a reward returns a finite float or None")
    if declared is None:
        if abs(score) > UNDECLARED_LIMIT:
            raise InvalidScore(
                f"returned {score:g}, beyond ±{UNDECLARED_LIMIT:g} (declare its range with @reward_fn)"
            )
        return score
    lo, hi = declared
    tol = RANGE_TOL * max(1.0, hi - lo)
    if not lo - tol <= score <= hi + tol:
        raise InvalidScore(f"returned {score!r}, outside its declared range {declared}")
    return score


def _get(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _call_reward(
    fn: Callable[..., Any],
    params: Mapping[str, Any],
    completion: str,
    reference: Mapping[str, Any],
    outcome: Mapping[str, Any],
) -> Any:
    """``fn(completion, reference, outcome, **params)`` with read-only views of the task's data."""
    return fn(completion, MappingProxyType(dict(reference)), MappingProxyType(dict(outcome)), **params)


class Rubric:
    """A weighted set of rewards with safe execution.

    Args:
        items: The rewards; names must be unique.
        timeout_s: Per-call deadline in seconds.
        workers: Worker processes for isolated rewards (0 runs every reward in the trainer, SIGALRM-guarded).

    """

    def __init__(self, items: Iterable[RubricItem], timeout_s: float = 10.0, workers: int = 2) -> None:
        self.items = list(items)
        if not self.items:
            raise ValueError("a rubric needs at least one reward")
        names = [it.name for it in self.items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"reward names must be unique in a rubric, repeated: {dup}")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"reward timeout_s must be a finite number > 0, got {timeout_s!r}")
        if workers < 0:
            raise ValueError(f"reward workers must be >= 0, got {workers!r}")
        self.timeout_s = float(timeout_s)
        self.workers = int(workers)
        self._pool: WorkerPool | None = None
        self._warned_no_timeout = False

    @classmethod
    def from_config(
        cls, reward_cfgs: Sequence[Any], env: Env, timeout_s: float = 10.0, workers: int = 2
    ) -> Rubric:
        """Build from the recipe's ``rewards:`` list (objects or dicts with ``name``, ``weight``, ``params``).

        An empty list means ``env.default_rewards`` (name → weight). Params an env supplies in
        ``env.default_reward_params`` (name → kwargs, e.g. costs from env options) are the defaults for that
        reward, whether it comes from the env's defaults or the recipe; the recipe's params win.

        Raises:
            ValueError: No rewards at all, a bad weight, or a param the reward does not take.
            rltk.plugins.PluginError: An unknown reward name.

        """
        if not reward_cfgs:
            reward_cfgs = [{"name": n, "weight": w} for n, w in env.default_rewards.items()]
            if not reward_cfgs:
                raise ValueError(f"the recipe names no rewards and env '{env.name}' has no default_rewards")
        env_params: Mapping[str, Mapping[str, Any]] = getattr(env, "default_reward_params", {}) or {}
        items = []
        for cfg in reward_cfgs:
            name = _get(cfg, "name", None)
            if not name:
                raise ValueError(f"every reward needs a name, got {cfg!r}")
            params = {**env_params.get(name, {}), **(_get(cfg, "params", None) or {})}
            fn = plugins.get_reward(name)
            items.append(RubricItem(name, fn, _get(cfg, "weight", 1.0), params, _get(cfg, "isolated", True)))
        return cls(items, timeout_s=timeout_s, workers=workers)

    def close(self) -> None:
        """Stop the worker processes (idempotent; a later :meth:`score` starts them again)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _call_all(self, rollouts: Sequence[Rollout]) -> dict[str, list[CallResult]]:
        """Every item's call on every rollout: isolated ones in one batch through the pool, others here."""
        args = [(r.turns[-1] if r.turns else "", r.task.reference, r.outcome) for r in rollouts]
        isolated = [it for it in self.items if it.isolated and self.workers > 0]
        results: dict[str, list[CallResult]] = {}
        if isolated and args:
            if self._pool is None:
                fns = [functools.partial(_call_reward, it.fn, it.params) for it in isolated]
                self._pool = WorkerPool(fns, workers=self.workers)
            calls = [Call(k, a, {}) for k in range(len(isolated)) for a in args]
            done = self._pool.run(calls, self.timeout_s)
            for k, it in enumerate(isolated):
                results[it.name] = list(done[k * len(args) : (k + 1) * len(args)])
        here = [it for it in self.items if it.name not in results]
        if here and args and not can_alarm() and not self._warned_no_timeout:
            logger.warning("rewards run in the trainer off the main thread: no reward timeout is enforced")
            self._warned_no_timeout = True
        for it in here:
            results[it.name] = [self._call_here(it, a) for a in args]
        return results

    def _call_here(
        self, item: RubricItem, args: tuple[str, Mapping[str, Any], Mapping[str, Any]]
    ) -> CallResult:
        try:
            call = functools.partial(_call_reward, item.fn, item.params)
            return CallResult(call_with_timeout(call, args, {}, self.timeout_s))
        except CallTimeout as e:
            return CallResult(failure="timeout", detail=str(e))
        except (Exception, SystemExit) as e:  # KeyboardInterrupt propagates
            return CallResult(failure="raised", detail=repr(e))

    def score(self, groups: Sequence[Group]) -> dict[str, float]:
        """Score every rollout: set ``scores``, ``reward`` and, for a reward bug, ``failures``; metrics.

        A rollout the env failed on (a ``"env"`` failure) is not scored. A failed rollout's ``reward`` is
        NaN. Metrics per reward: ``reward/<name>/mean`` and ``/std`` over the samples it scored (left out
        when none), ``/failed`` (calls that failed, of any kind), ``/errors`` (raised or crashed),
        ``/timeouts``, ``/invalid`` (not a finite real within the declared range), ``/not_applicable``;
        and ``reward/total/mean``, ``reward/total/std`` over the rollouts that did not fail.
        """
        rollouts = [r for g in groups for r in g.rollouts]
        for r in rollouts:  # scoring again starts afresh; what the env said stays
            r.scores = {}
            r.failures = [f for f in r.failures if f.source == "env"]
        live = [r for r in rollouts if not r.failed]
        results = self._call_all(live)
        metrics: dict[str, float] = {}
        for item in self.items:
            values: list[float] = []
            kinds: Counter[str] = Counter()
            for r, res in zip(live, results[item.name], strict=True):
                score, failure = None, None
                if res.failure is not None:
                    failure = Failure(item.name, res.failure, res.detail)
                else:
                    try:
                        score = as_score(res.value, item.range)
                    except InvalidScore as e:
                        failure = Failure(item.name, "invalid", str(e))
                if failure is not None:
                    r.failures.append(failure)
                    kinds[failure.kind] += 1
                elif score is None:
                    kinds["not_applicable"] += 1
                else:
                    values.append(score)
                r.scores[item.name] = score
            metrics.update(_item_metrics(item.name, values, kinds))
            failed = int(metrics[f"reward/{item.name}/failed"])
            if failed:
                first = next(f for r in live for f in r.failures if f.source == item.name)
                logger.warning(
                    "reward '%s' failed on %d/%d rollouts this step (%s); they leave the update. First: %s",
                    item.name, failed, len(live), dict(kinds), first,
                )  # fmt: skip
        weights = {it.name: it.weight for it in self.items}
        for r in rollouts:
            scored = (weights[n] * s for n, s in r.scores.items() if s is not None)
            r.reward = math.nan if r.failed else float(sum(scored))
        totals = [r.reward for r in rollouts if not r.failed]
        if totals:
            metrics["reward/total/mean"] = float(np.mean(totals))
            metrics["reward/total/std"] = float(np.std(totals))
        return metrics


def _item_metrics(name: str, values: list[float], kinds: Mapping[str, int]) -> dict[str, float]:
    key = f"reward/{name}"
    out = {
        f"{key}/failed": float(sum(kinds.get(k, 0) for k in get_args(FailureKind))),
        f"{key}/errors": float(kinds.get("raised", 0) + kinds.get("crashed", 0)),
        f"{key}/timeouts": float(kinds.get("timeout", 0)),
        f"{key}/invalid": float(kinds.get("invalid", 0)),
        f"{key}/not_applicable": float(kinds.get("not_applicable", 0)),
    }
    if values:
        out[f"{key}/mean"] = float(np.mean(values))
        out[f"{key}/std"] = float(np.std(values))
    return out
