"""What a reward declares about itself, and what it may return.

:func:`reward_fn` marks a function (either form of :mod:`rltk.reward_contract`) with its score range, a
version, a one-line description and the form of text it reads (``format``); ``rltk rewards list`` shows
them. :func:`declared_range` gives the range for one call's params; :func:`as_score` checks one returned
value against it. These used to live in :mod:`rltk.reward`, which still exports them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

import numpy as np

F = TypeVar("F", bound=Callable[..., Any])
Range = tuple[float, float]
Format = Literal["text", "messages"]
FORMATS: tuple[Format, ...] = ("text", "messages")

CONTEXT_NAMES = ("reference", "outcome", "prompt")
"""What rltk passes a per-sample reward by name, besides the completion (never a param's name)."""

TRL_NAMES = (
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
    "environments",
)
"""The keyword arguments TRL's ``GRPOTrainer`` passes a reward function (never a param's name)."""


def _check_range(value: Any) -> Range:
    lo, hi = (float(x) for x in value)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"reward range must be finite (lo, hi) with lo <= hi, got {value!r}")
    return lo, hi


def reward_fn(
    range: Range | Callable[..., Range] | None = None,
    *,
    version: str = "",
    description: str | None = None,
    format: Format | None = None,
) -> Callable[[F], F]:
    """Mark a function as a reward: its score range, version, description and format; otherwise a no-op.

    A parse failure of the model's output should score the range minimum. Where the range depends on the
    reward's params (a cost), pass a function of those params: it is called with every param the reward
    takes (those with defaults, filled in; not the names rltk passes) and returns ``(lo, hi)``. Scores
    outside the range declared for the call's params are reward bugs (:func:`as_score`).

    Args:
        range: ``(lo, hi)`` with ``lo <= hi``, both finite; or ``fn(**params) -> (lo, hi)``; ``None``:
            undeclared (scores must then stay within ±1e6).
        version: The reward's version (shown by ``rltk rewards list``; bump it when scores change).
        description: One line for ``rltk rewards list``; default: the docstring's first line.
        format: What it reads: ``"text"`` (strings) or ``"messages"`` (TRL's conversational form); a
            recipe's ``rewards.N.format`` overrides it; default ``"text"``.

    Returns:
        A decorator that sets ``fn.reward_range`` (the range at the default params), ``fn.reward_version``,
        ``fn.reward_description`` and ``fn.reward_format``, and returns ``fn``.

    >>> @reward_fn(range=(0.0, 1.0), version="1.1")
    ... def exact(completion, reference, outcome):
    ...     '''1 when the answer is the reference's, else 0.'''
    ...     return float(completion == reference["answer"])
    >>> exact.reward_range, exact.reward_version, exact.reward_description
    ((0.0, 1.0), '1.1', "1 when the answer is the reference's, else 0.")
    >>> @reward_fn(range=lambda cost: (-cost, 1.0))
    ... def decision(completion, reference, outcome, cost=2.0):
    ...     return 1.0 if completion == reference["answer"] else -cost
    >>> decision.reward_range, declared_range(decision, {"cost": 5.0})
    ((-2.0, 1.0), (-5.0, 1.0))

    """
    spec = range if range is None or callable(range) else _check_range(range)
    if format is not None and format not in FORMATS:
        raise ValueError(f"reward format must be one of {FORMATS}, got {format!r}")

    def mark(fn: F) -> F:
        fn.reward_range_of = spec  # type: ignore[attr-defined]
        fn.reward_range = declared_range(fn, {})  # type: ignore[attr-defined]
        fn.reward_version = str(version)  # type: ignore[attr-defined]
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        fn.reward_description = description or (doc[0] if doc else "")  # type: ignore[attr-defined]
        fn.reward_format = format  # type: ignore[attr-defined]
        return fn

    return mark


def description_of(fn: Callable[..., Any]) -> str:
    """A reward's one-line description: declared, else its docstring's first line, else ``""``."""
    declared = getattr(fn, "reward_description", None)
    if declared:
        return str(declared).splitlines()[0]
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return doc[0] if doc else ""


def range_params(fn: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments a range function gets: ``fn``'s params with defaults, updated by ``params``.

    >>> def r(completion, reference, outcome, cost=2.0, **kw):
    ...     return 0.0
    >>> range_params(r, {"scale": 3})
    {'cost': 2.0, 'scale': 3}
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return dict(params)
    named = {
        p.name: p.default
        for p in sig.parameters.values()
        if p.default is not p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in CONTEXT_NAMES + TRL_NAMES
    }
    return {**named, **params}


def declared_range(fn: Callable[..., Any], params: Mapping[str, Any]) -> Range | None:
    """The range ``fn`` declares for ``params`` (see :func:`reward_fn`); ``None`` if it declares none.

    Raises:
        ValueError: The range function rejects the params, or returns no finite ``(lo, hi)``.

    """
    spec = getattr(fn, "reward_range_of", None) or getattr(fn, "reward_range", None)
    if spec is None or not callable(spec):
        return None if spec is None else _check_range(spec)
    try:
        return _check_range(spec(**range_params(fn, params)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"its declared range does not hold for params {dict(params)}: {e}") from None


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
    rltk.reward_spec.InvalidScore: returned 7.0, outside its declared range (0.0, 1.0)
    >>> as_score(True, None)
    Traceback (most recent call last):
    ...
    rltk.reward_spec.InvalidScore: returned True (bool); a reward returns a finite float or None

    """
    if value is None:
        return None
    if isinstance(value, InvalidScore):  # a batch reward's bad return, already diagnosed
        raise value
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


def _range_text(fn: Callable[..., Any]) -> str:
    rng = getattr(fn, "reward_range", None)
    if rng is None:
        return "-"
    by_params = callable(getattr(fn, "reward_range_of", None))
    return f"[{rng[0]:g}, {rng[1]:g}]" + ("*" if by_params else "")


def listing() -> list[str]:
    """``rltk rewards list``: one line per reward (name, form, format, range, version, description).

    A range marked ``*`` depends on the params (shown at their defaults); a reward whose plugin fails to
    load says why instead.
    """
    from rltk import plugins
    from rltk.reward_contract import form_of

    lines = [f"{'name':<24} {'form':<6} {'format':<8} {'range':<12} {'version':<8} description"]
    for name, desc in sorted(plugins.list_rewards().items()):
        if desc.startswith("failed to load"):
            lines.append(f"{name:<24} {'-':<6} {'-':<8} {'-':<12} {'-':<8} {desc}")
            continue
        fn = plugins.get_reward(name)
        fmt = getattr(fn, "reward_format", None) or "text"
        version = getattr(fn, "reward_version", "") or "-"
        lines.append(
            f"{name:<24} {form_of(fn):<6} {fmt:<8} {_range_text(fn):<12} {version:<8} {description_of(fn)}"
        )
    return lines
