"""Stage 2, reward: score every rollout with a weighted rubric of reward functions, safely.

    groups ──▶ Rubric.score ──▶ rollout.scores[name] (float | None), rollout.reward (weighted sum), metrics
                          └──▶ rollout.failures (a reward bug) ──▶ FailureGuard (stop past the allowed rate)

A reward is a plain function in one of two forms (:mod:`rltk.reward_contract`, told apart by its signature):
per-sample ``fn(completion, reference, outcome, **params) -> float | None``, or TRL's batch form
``fn(prompts, completions, **kwargs) -> list[float | None]``, called once per group. :func:`reward_fn`
records its range (a fixed pair, or a function of the params), version, description and format
(:mod:`rltk.reward_spec`). ``completion`` is the final assistant turn, ``reference`` the task's gold data,
``outcome`` the env's verdict. ``None`` means "not applicable to this task" (decided by the task) and is left
out of the weighted sum and of the reward's mean/std.

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

import functools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, get_args

import numpy as np

from rltk import plugins
from rltk.batch import Failure, FailureKind
from rltk.deadline import CallTimeout, call_with_timeout, can_alarm
from rltk.reward_contract import Contract, invoke, make_contract, payloads, split_batch
from rltk.reward_spec import (  # re-exported: they were defined here
    RANGE_TOL,
    UNDECLARED_LIMIT,
    InvalidScore,
    Range,
    as_score,
    declared_range,
    reward_fn,
)
from rltk.workers import Call, CallResult, WorkerPool

if TYPE_CHECKING:
    from rltk.batch import Group, Rollout
    from rltk.env import Env

logger = logging.getLogger(__name__)


__all__ = [
    "RANGE_TOL",
    "UNDECLARED_LIMIT",
    "InvalidScore",
    "RewardError",
    "RewardFn",
    "Rubric",
    "RubricItem",
    "as_score",
    "check_params",
    "declared_range",
    "reward_fn",
]


class RewardFn(Protocol):
    """The per-sample reward contract (``reward_range`` is set by :func:`reward_fn`).

    TRL's batch form is ``fn(prompts, completions, **kwargs) -> list[float | None]``
    (:mod:`rltk.reward_contract`).
    """

    def __call__(
        self, completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any], /, **params: Any
    ) -> float | None:
        """Score one completion; ``None`` = not applicable to this task."""


class RewardError(RuntimeError):
    """Rewards failed on too many rollouts, or a rubric is misconfigured."""


@dataclass
class RubricItem:
    """One reward of a rubric.

    Attributes:
        name: Key in ``rollout.scores`` and in the metrics (``reward/<name>/...``).
        fn: The reward function, per-sample or batch (:mod:`rltk.reward_contract`).
        weight: Its weight in ``rollout.reward``.
        params: Keyword arguments passed on every call (validated against ``fn``'s signature).
        isolated: Run in a worker process with a hard deadline (default). ``False`` runs it in the trainer
            under a SIGALRM deadline, which cannot stop a call stuck in C code: only for cheap pure rewards
            (``benchmarks/reward_ipc.py`` measures what the worker costs).
        format: ``text`` | ``messages`` | ``auto`` (the reward's declared format, else ``text``).
        range: The range ``fn`` declares for ``params`` (``None``: undeclared), set on construction.
        contract: How ``fn`` is called, set on construction.

    """

    name: str
    fn: Callable[..., Any]
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    isolated: bool = True
    format: str = "auto"
    range: Range | None = field(init=False, default=None)
    contract: Contract = field(init=False)

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"reward '{self.name}': weight must be finite, got {self.weight!r}")
        self.weight = float(self.weight)
        self.params = dict(self.params)
        try:
            self.contract = make_contract(self.fn, self.params, self.format)
            self.range = declared_range(self.fn, self.params)
        except ValueError as e:
            raise ValueError(f"reward '{self.name}': {e}") from None


def check_params(name: str, fn: Callable[..., Any], params: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the reward and what to fix if ``fn`` cannot be called with ``params``.

    >>> def r(completion, reference, outcome, scale=1.0):
    ...     return scale
    >>> check_params("r", r, {"scael": 2.0})
    Traceback (most recent call last):
    ...
    ValueError: reward 'r': scael: not a parameter of the reward → did you mean 'scale'? valid params: scale
    """
    try:
        make_contract(fn, params)
    except ValueError as e:
        raise ValueError(f"reward '{name}': {e}") from None


def _get(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


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
            weight, isolated, fmt = (
                _get(cfg, "weight", 1.0),
                _get(cfg, "isolated", True),
                _get(cfg, "format", "auto"),
            )
            items.append(RubricItem(name, fn, weight, params, isolated, fmt))
        return cls(items, timeout_s=timeout_s, workers=workers)

    def close(self) -> None:
        """Stop the worker processes (idempotent; a later :meth:`score` starts them again)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _call_all(self, groups: Sequence[Sequence[Rollout]]) -> dict[str, list[CallResult]]:
        """Every item's results, one per rollout of ``groups`` in order.

        Isolated items run in one batch through the pool, others here. A batch item's call covers a group;
        its failure fails every rollout of it.
        """
        plans = {it.name: payloads(it.contract, groups) for it in self.items}
        isolated = [it for it in self.items if it.isolated and self.workers > 0]
        done: dict[str, list[CallResult]] = {}
        if isolated and any(plans[it.name] for it in isolated):
            if self._pool is None:
                fns = [functools.partial(invoke, it.fn, it.contract, it.params) for it in isolated]
                self._pool = WorkerPool(fns, workers=self.workers)
            calls = [Call(k, a, kw) for k, it in enumerate(isolated) for a, kw, _ in plans[it.name]]
            flat = iter(self._pool.run(calls, self.timeout_s))
            done = {it.name: [next(flat) for _ in plans[it.name]] for it in isolated}
        here = [it for it in self.items if it.name not in done]
        if here and any(plans[it.name] for it in here) and not can_alarm() and not self._warned_no_timeout:
            logger.warning("rewards run in the trainer off the main thread: no reward timeout is enforced")
            self._warned_no_timeout = True
        for it in here:
            done[it.name] = [self._call_here(it, a, kw) for a, kw, _ in plans[it.name]]
        results: dict[str, list[CallResult]] = {}
        for it in self.items:
            results[it.name] = []
            for res, (_, _, n) in zip(done[it.name], plans[it.name], strict=True):
                if it.contract.form == "sample" or res.failure is not None:
                    results[it.name] += [res] * n
                else:
                    results[it.name] += [CallResult(v) for v in split_batch(res.value, n)]
        return results

    def _call_here(self, item: RubricItem, args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallResult:
        try:
            call = functools.partial(invoke, item.fn, item.contract, item.params)
            return CallResult(call_with_timeout(call, args, kwargs, self.timeout_s))
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
        live_groups = [[r for r in g.rollouts if not r.failed] for g in groups]
        live = [r for g in live_groups for r in g]
        results = self._call_all(live_groups)
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
