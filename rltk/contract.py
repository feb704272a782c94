"""The env contract where the engine meets an env: the typed verdict :class:`Outcome` and its checks.

Everything an env hands the engine is checked where it enters: ``check``'s verdict (:meth:`Outcome.of`), a
scripted policy's turn (:func:`check_action`), a :class:`~rltk.env.Task`'s fields (:func:`task_problems`)
and the class attributes (:func:`class_problems`). A violation raises :class:`EnvContractError`, which
names the env, what it got and the fix; the CLI prints it as ``error: ...`` with exit code 2. Without these,
a verdict missing ``correct`` scored every policy 0% (the oracle included) and said nothing.
``rltk envs check`` (:mod:`rltk.envcheck`) runs the whole contract on an env. Nothing here imports torch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rltk.env import Env, Task

RESERVED = ("correct", "answer", "cost")
"""The verdict keys the engine reads (accuracy; ``algorithm.balance_answers`` and answer shares; env cost)."""

VERDICT_FIX = (
    "return rltk.env.Outcome(correct=<bool>, answer=<the parsed answer or None>) from check (or the "
    "episode's outcome), or a dict with a bool 'correct'"
)


class EnvContractError(Exception):
    """An env broke its contract with the engine; ``why`` and ``fix`` are also kept apart (config messages).

    Args:
        env: The env's name (or what identifies it, e.g. a task id's prefix).
        why: What it did.
        fix: How to fix it.

    """

    def __init__(self, env: str, why: str, fix: str) -> None:
        self.env, self.why, self.fix = env, why, fix
        super().__init__(f"env {env!r}: {why} → {fix}")


class EnvContractWarning(UserWarning):
    """An env works but misses what a setting needs (e.g. ``answer`` for ``algorithm.balance_answers``)."""


def _as_bool(value: Any) -> bool | None:
    """``value`` as a bool if it is one (Python's or numpy's), else None."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    return None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, eq=False)
class Outcome(Mapping[str, Any]):
    """The env's verdict on an episode, typed; also a read-only mapping, so ``outcome["decision"]`` works.

    As a mapping it holds ``correct``, ``answer`` and ``cost`` where the env gave them (``given``), then the
    ``extra`` keys: what a dict verdict held. It compares equal to a mapping with the same items.

    Attributes:
        correct: Whether the episode solved the task (accuracy, the ``correct`` reward, the oracle's 100%).
        answer: The parsed answer class, for ``algorithm.balance_answers`` and answer shares (None:
            unparseable, in no class).
        cost: The env's own cost of the outcome (reports give it per 1,000 tasks), where it has one.
        extra: Everything else the env reports (rewards read it, e.g. ``outcome["decision"]``).
        given: Which of ``answer``/``cost`` the env gave (default: those not None). A dict verdict gives the
            keys it has, so an ``"answer": None`` (unparseable) still says that the env has answer classes.

    """

    correct: bool
    answer: Hashable | None = None
    cost: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    given: frozenset[str] | None = field(default=None, repr=False)
    _items: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        correct = _as_bool(self.correct)
        if correct is None:
            raise TypeError(f"Outcome.correct must be a bool, got {_short(self.correct)}")
        if self.answer is not None and not isinstance(self.answer, Hashable):
            raise TypeError(
                f"Outcome.answer must be hashable (str, int, tuple, ...), got {_short(self.answer)}"
            )
        if self.cost is not None and (isinstance(self.cost, bool) or not isinstance(self.cost, int | float)):
            raise TypeError(f"Outcome.cost must be a number or None, got {_short(self.cost)}")
        clash = sorted(set(self.extra) & set(RESERVED))
        if clash:
            raise TypeError(f"Outcome.extra must not hold {clash}: they are fields")
        given = self.given
        if given is None:
            given = frozenset(k for k in ("answer", "cost") if getattr(self, k) is not None)
        items: dict[str, Any] = {"correct": correct}
        items.update({k: getattr(self, k) for k in ("answer", "cost") if k in given})
        items.update(self.extra)
        object.__setattr__(self, "correct", correct)
        object.__setattr__(self, "given", frozenset(given))
        object.__setattr__(self, "_items", items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @classmethod
    def of(cls, env: str, value: Any, source: str = "check") -> Outcome:
        """``value`` (an :class:`Outcome`, or a mapping with a bool ``correct``) as an Outcome.

        Args:
            env: The env's name, for the error.
            value: What the env returned.
            source: Where it came from, for the error (``"check"``, ``"the episode's outcome"``).

        Raises:
            EnvContractError: For anything else (a float, None, a dict without a bool ``correct``, an
                unhashable ``answer``, a cost that is not a number), naming the env, the value and the fix.

        >>> Outcome.of("demo", {"correct": True, "answer": "FLAG", "rule": "R1"})["rule"]
        'R1'
        >>> Outcome.of("demo", 0.5)
        Traceback (most recent call last):
        ...
        rltk.contract.EnvContractError: env 'demo': check returned 0.5 (float), not a verdict → ...

        """
        if isinstance(value, Outcome):
            return value
        if not isinstance(value, Mapping):
            why = f"{source} returned {_short(value)} ({type(value).__name__}), not a verdict"
            raise EnvContractError(env, why, VERDICT_FIX)
        if "correct" not in value:
            why = (
                f"{source} returned a verdict without 'correct' (keys: {sorted(map(str, value))}): every "
                "policy would score 0%, the oracle included"
            )
            raise EnvContractError(env, why, VERDICT_FIX)
        if _as_bool(value["correct"]) is None:
            why = f"{source} returned 'correct': {_short(value['correct'])}, not a bool"
            raise EnvContractError(env, why, "set 'correct' to True or False (bool(...) of your test)")
        extra = {k: v for k, v in value.items() if k not in RESERVED}
        given = frozenset(k for k in ("answer", "cost") if k in value)
        try:
            return cls(value["correct"], value.get("answer"), value.get("cost"), extra, given)
        except TypeError as exc:
            why = f"{source} returned a bad verdict: {exc}"
            raise EnvContractError(env, why, "'answer' must be hashable and 'cost' a number") from None


def env_name(env: Any) -> str:
    """``env.name``, or its class's name where it sets none (for messages)."""
    name = getattr(env, "name", None)
    return name if isinstance(name, str) and name else type(env).__name__


def check_action(env: str, policy: Any, action: Any) -> str:
    """Return ``action`` if it is a str (a scripted policy's turn), else raise :class:`EnvContractError`."""
    if isinstance(action, str):
        return action
    name = getattr(policy, "__qualname__", None) or type(policy).__qualname__
    why = f"policy {name} returned {_short(action)} ({type(action).__name__}), not the next assistant text"
    fix = "an oracle, teacher or baseline returns a str for every conversation (never None)"
    raise EnvContractError(env, why, fix)


def task_problems(task: Task) -> list[str]:
    """What is wrong with ``task``'s fields (types a generator got wrong); empty if nothing."""
    problems = []
    if not isinstance(task.id, str) or not task.id:
        problems.append(f"id {_short(task.id)} is not a non-empty str")
    if not isinstance(task.split, str):
        problems.append(f"split {_short(task.split)} is not a str")
    if not isinstance(task.messages, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in task.messages
    ):
        problems.append("messages is not a list of {'role': str, 'content': str} dicts")
    for name in ("reference", "info"):
        if not isinstance(getattr(task, name), Mapping):
            problems.append(f"{name} {_short(getattr(task, name))} is not a dict")
    if task.tools is not None and not isinstance(task.tools, list):
        problems.append(f"tools {_short(task.tools)} is not None or a list of JSON schemas")
    return problems


def check_task(task: Task) -> None:
    """Raise :class:`EnvContractError` naming every bad field of ``task`` (called by ``Task`` itself)."""
    problems = task_problems(task)
    if problems:
        env = task.id.split("/")[0] if isinstance(task.id, str) and task.id else "?"
        fix = (
            "build it as Task(id: str, split: str, messages: [{'role': ..., 'content': ...}], "
            "reference: dict, info: dict = {}, tools: list | None = None)"
        )
        raise EnvContractError(env, f"task {_short(task.id)}: " + "; ".join(problems), fix)


def description_of(cls: type) -> str:
    """An env class's one-line description: its ``description``, else its own docstring's first line."""
    text = getattr(cls, "description", None)
    if not isinstance(text, str) or not text.strip():
        text = cls.__dict__.get("__doc__") or ""  # its own: Env's docstring would describe every env
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def class_problems(cls: type[Env]) -> list[tuple[str, str]]:
    """``(why, fix)`` for each class attribute of an env the engine cannot use; empty if none.

    A missing description is not one of them (the listing falls back to the docstring, and ``rltk envs
    check`` fails it): an env without one still trains.
    """
    problems = []
    rewards = getattr(cls, "default_rewards", {})
    example = "default_rewards = {'my_reward': 1.0}"
    if not isinstance(rewards, Mapping):
        why = f"default_rewards is a {type(rewards).__name__} ({_short(rewards)}), not a dict"
        problems.append((why, f"map each reward name to its weight: {example}"))
    else:
        bad = {k: v for k, v in rewards.items() if not isinstance(k, str) or not _is_weight(v)}
        if bad:
            problems.append((f"default_rewards has bad entries {bad}", f"names to finite weights: {example}"))
    turns = getattr(cls, "max_turns", 1)
    if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
        problems.append((f"max_turns is {_short(turns)}", "set max_turns to an int >= 1 (1: single-turn)"))
    return problems


def _is_weight(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


_WARNED_NO_ANSWER: set[str] = set()


def warn_if_no_answers(env: Env, rollouts: Sequence[Any]) -> bool:
    """Warn once per env class when its verdicts carry no ``answer`` (while ``algorithm.balance_answers``).

    A step whose verdicts all lack ``answer`` may only mean that no sample parsed (an env's typed
    :class:`Outcome` leaves out an ``answer`` of None), so the env's oracle is asked too, on the first task:
    its answer always parses.

    Args:
        env: The env.
        rollouts: One step's rollouts (anything with ``task`` and ``outcome``).

    Returns:
        True when it warned (now or before) for ``env``.

    """
    from rltk.env import run_policy

    name, key = env_name(env), f"{type(env).__module__}.{type(env).__qualname__}"
    if key in _WARNED_NO_ANSWER:
        return True
    if not rollouts or any("answer" in r.outcome for r in rollouts):
        return False
    if "answer" in run_policy(env, rollouts[0].task, env.oracle).outcome:
        return False
    _WARNED_NO_ANSWER.add(key)
    warnings.warn(
        f"env {name!r}: algorithm.balance_answers is on but its verdicts carry no 'answer', so balancing "
        "does nothing → return the parsed answer class from check (Outcome(answer=...) or 'answer' in the "
        "dict), or set algorithm.balance_answers: false",
        EnvContractWarning,
        stacklevel=2,
    )
    return True
