"""Stage 2, reward: score every rollout with a weighted rubric of reward functions, safely.

    groups ──▶ Rubric.score ──▶ rollout.scores[name] (float | None), rollout.reward (weighted sum), metrics

A reward is a plain function ``fn(completion, reference, outcome, **params) -> float | None`` decorated with
:func:`reward_fn`, which records its range. ``completion`` is the final assistant turn, ``reference`` the
task's gold data, ``outcome`` the env's verdict. ``None`` means "not applicable to this task" and is left out
of the weighted sum and of the reward's mean/std.

Rewards are user code run on untrusted model output, so each call is guarded: an exception or a call that
runs past ``timeout_s`` scores ``None`` for that sample and is counted (``reward/<name>/errors``,
``/timeouts``), with one log warning per reward per step. A reward that fails on every sample of a step
raises :class:`RewardError`: a broken plugin must not silently train on nothing.

The timeout uses ``SIGALRM`` (``signal.setitimer(ITIMER_REAL)``), so it works only on the main thread of a
POSIX process; elsewhere (another thread, Windows) rewards run without a timeout, and a warning says so once.
A call stuck inside C code (a huge regex, a blocking syscall) is interrupted only when it returns to Python.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
import numbers
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from rltk import plugins

if TYPE_CHECKING:
    from rltk.batch import Group
    from rltk.env import Env

logger = logging.getLogger(__name__)


class RewardFn(Protocol):
    """The reward contract (``reward_range`` is set by :func:`reward_fn`)."""

    def __call__(
        self, completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any], /, **params: Any
    ) -> float | None:
        """Score one completion; ``None`` = not applicable to this task."""


class RewardError(RuntimeError):
    """A reward failed on every sample of a step, or a rubric is misconfigured."""


F = TypeVar("F", bound=Callable[..., Any])


def reward_fn(range: tuple[float, float]) -> Callable[[F], F]:
    """Mark a function as a reward with its score range ``(lo, hi)``; otherwise a no-op.

    A parse failure of the model's output should score ``lo``. Where the range depends on params, declare it
    for the defaults and document the dependence on the function.

    Args:
        range: ``(lo, hi)`` with ``lo <= hi``, both finite.

    Returns:
        A decorator that sets ``fn.reward_range`` and returns ``fn`` unchanged.

    >>> @reward_fn(range=(0.0, 1.0))
    ... def exact(completion, reference, outcome):
    ...     return float(completion == reference["answer"])
    >>> exact.reward_range
    (0.0, 1.0)

    """
    lo, hi = (float(x) for x in range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"reward range must be finite (lo, hi) with lo <= hi, got {range!r}")

    def mark(fn: F) -> F:
        fn.reward_range = (lo, hi)  # type: ignore[attr-defined]
        return fn

    return mark


@dataclass
class RubricItem:
    """One reward of a rubric.

    Attributes:
        name: Key in ``rollout.scores`` and in the metrics (``reward/<name>/...``).
        fn: The reward function.
        weight: Its weight in ``rollout.reward``.
        params: Keyword arguments passed on every call (validated against ``fn``'s signature).

    """

    name: str
    fn: Callable[..., float | None]
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"reward '{self.name}': weight must be finite, got {self.weight!r}")
        self.weight = float(self.weight)
        self.params = dict(self.params)
        check_params(self.name, self.fn, self.params)


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


class RewardTimeout(TimeoutError):
    """A reward call ran past the rubric's ``timeout_s``."""


class _Timeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so a reward's ``except Exception`` cannot swallow it."""


def _can_alarm() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def call_with_timeout(
    fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], timeout_s: float
) -> Any:
    """Call ``fn(*args, **kwargs)``; raise :class:`RewardTimeout` after ``timeout_s`` (main thread only).

    Off the main thread (or without ``setitimer``) the call runs unguarded. An outer ``ITIMER_REAL`` timer
    (e.g. a test timeout) is suspended during the call and restored afterwards, less the time spent here
    (if it fell due meanwhile, it fires right after).
    """
    if not _can_alarm():
        return fn(*args, **kwargs)

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Timeout

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    prev_delay, prev_interval = 0.0, 0.0
    try:
        prev_delay, prev_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        raise RewardTimeout(f"took longer than {timeout_s:g} s") from None
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if prev_delay > 0:
            left = max(prev_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, prev_interval)


def _as_score(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or not math.isfinite(value):  # bool and numpy scalars pass
        raise TypeError(f"returned {value!r}; a reward must return a finite float or None")
    return float(value)


def _get(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


class Rubric:
    """A weighted set of rewards with safe execution.

    Args:
        items: The rewards; names must be unique.
        timeout_s: Per-call limit in seconds (main thread only, see the module docstring).

    """

    def __init__(self, items: Iterable[RubricItem], timeout_s: float = 10.0) -> None:
        self.items = list(items)
        if not self.items:
            raise ValueError("a rubric needs at least one reward")
        names = [it.name for it in self.items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"reward names must be unique in a rubric, repeated: {dup}")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"reward timeout_s must be a finite number > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._warned_no_timeout = False

    @classmethod
    def from_config(cls, reward_cfgs: Sequence[Any], env: Env, timeout_s: float = 10.0) -> Rubric:
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
            items.append(RubricItem(name, plugins.get_reward(name), _get(cfg, "weight", 1.0), params))
        return cls(items, timeout_s=timeout_s)

    def score(self, groups: Sequence[Group]) -> dict[str, float]:
        """Score every rollout: set ``rollout.scores[name]`` and ``rollout.reward``; return metrics.

        Metrics per reward: ``reward/<name>/mean`` and ``/std`` over the samples where it applied (left out
        when it applied to none), ``/errors``, ``/timeouts``, ``/not_applicable`` (counts); and
        ``reward/total/mean``, ``reward/total/std``.

        Raises:
            RewardError: A reward failed (raised or timed out) on every sample of this step.

        """
        rollouts = [r for g in groups for r in g.rollouts]
        if rollouts and not self._warned_no_timeout and not _can_alarm():
            logger.warning("rewards run off the main thread: no reward timeout is enforced")
            self._warned_no_timeout = True
        metrics: dict[str, float] = {}
        for r in rollouts:
            r.scores = {}
        for item in self.items:
            values: list[float] = []
            errors = timeouts = not_applicable = 0
            first: BaseException | None = None
            for r in rollouts:
                args = (
                    r.turns[-1] if r.turns else "",
                    MappingProxyType(dict(r.task.reference)),
                    MappingProxyType(dict(r.outcome)),
                )
                score: float | None = None
                try:
                    score = _as_score(call_with_timeout(item.fn, args, item.params, self.timeout_s))
                except RewardTimeout as e:
                    timeouts += 1
                    first = first or e
                except Exception as e:
                    errors += 1
                    first = first or e
                else:
                    if score is None:
                        not_applicable += 1
                    else:
                        values.append(score)
                r.scores[item.name] = score
            failed = errors + timeouts
            if rollouts and failed == len(rollouts):
                raise RewardError(
                    f"reward '{item.name}' failed on all {failed} samples of this step "
                    f"({errors} errors, {timeouts} timeouts); first: {first!r}"
                ) from first
            if failed:
                logger.warning(
                    "reward '%s' failed on %d/%d samples this step (%d errors, %d timeouts over %g s); "
                    "first: %r; those samples score None",
                    item.name, failed, len(rollouts), errors, timeouts, self.timeout_s, first,
                )  # fmt: skip
            key = f"reward/{item.name}"
            if values:
                mean = sum(values) / len(values)
                metrics[f"{key}/mean"] = mean
                metrics[f"{key}/std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            metrics[f"{key}/errors"] = float(errors)
            metrics[f"{key}/timeouts"] = float(timeouts)
            metrics[f"{key}/not_applicable"] = float(not_applicable)
        weights = {it.name: it.weight for it in self.items}
        totals = []
        for r in rollouts:
            r.reward = float(sum(weights[n] * s for n, s in r.scores.items() if s is not None))
            totals.append(r.reward)
        if totals:
            mean = sum(totals) / len(totals)
            metrics["reward/total/mean"] = mean
            metrics["reward/total/std"] = math.sqrt(sum((v - mean) ** 2 for v in totals) / len(totals))
        return metrics
