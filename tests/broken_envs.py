"""A small env that keeps the env contract, and copies of it that each break one part of it.

Loaded as ``broken_envs:ClassName`` (tests/ is on sys.path / PYTHONPATH). ``rltk envs check`` must pass
:class:`ParityEnv` and fail each broken one on the row that names its fault.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, ClassVar

from rltk.env import (
    SPLITS,
    Env,
    Episode,
    Message,
    Outcome,
    Policy,
    Step,
    Task,
    Teacher,
    check_choice,
    draw_task,
)
from rltk.reward import reward_fn

WORDS = ("apple", "river", "stone", "cloud", "maple", "tiger", "piano", "lemon")


@reward_fn(range=(0.0, 1.0))
def parity_exact(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """1 for exactly the right word, else 0."""
    return 1.0 if completion.strip() == reference["parity"] else 0.0


class SkipsSevens(Teacher):
    """Answers ``odd`` for every number ending in 7 (wrong on purpose: the 7s slice)."""

    weak_slices: ClassVar[dict[str, tuple[Any, ...]]] = {"last_digit": (7,)}

    def __call__(self, messages: list[Message]) -> str:
        number = int(messages[-1]["content"].split()[-1].rstrip("?"))
        return "even" if number % 10 == 7 else ("even" if number % 2 == 0 else "odd")


class ParityEnv(Env):
    """Say whether a number is even or odd (the contract kept)."""

    name = "parity"
    description = "Say whether a number is even or odd."
    default_rewards: ClassVar[dict[str, float]] = {"broken_envs:parity_exact": 1.0}

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        check_choice("split", split, SPLITS)
        seen: set[str] = set()

        def candidate(i: int) -> Any:
            def draw(attempt: int) -> Task:
                rng = random.Random(f"{seed}:{split}:{i}:{attempt}")
                number = rng.randint(0, 10**6)
                text = f"{rng.choice(WORDS)}: is it even or odd? {number}"
                reference = {"parity": "even" if number % 2 == 0 else "odd"}
                info = {"last_digit": number % 10}
                return Task(
                    f"parity/{split}/{seed}/{i}", split, [{"role": "user", "content": text}], reference, info
                )

            return draw

        return [draw_task(split, seen, candidate(i)) for i in range(n)]

    def check(self, task: Task, completion: str) -> Any:
        answer = completion.strip() if completion.strip() in ("even", "odd") else None
        return {"correct": answer == task.reference["parity"], "answer": answer}

    def oracle(self, messages: list[Message]) -> Any:
        return "even" if int(messages[-1]["content"].split()[-1]) % 2 == 0 else "odd"

    def baselines(self) -> dict[str, Policy]:
        return {"always_even": lambda m: "even", "always_odd": lambda m: "odd"}

    def teacher(self) -> Teacher:
        return SkipsSevens()


class NoCorrectEnv(ParityEnv):
    """``check`` returns no ``correct``: every policy scored 0%, silently."""

    def check(self, task: Task, completion: str) -> Any:
        return {"answer": completion.strip()}


class FloatCheckEnv(ParityEnv):
    """``check`` returns a float (a score) instead of a verdict."""

    def check(self, task: Task, completion: str) -> Any:
        return float(super().check(task, completion)["correct"])


class NoneOracleEnv(ParityEnv):
    """The oracle returns None on odd numbers (a forgotten branch)."""

    def oracle(self, messages: list[Message]) -> Any:
        return "even" if int(messages[-1]["content"].split()[-1]) % 2 == 0 else None


class ListRewardsEnv(ParityEnv):
    """``default_rewards`` as a list (was an AttributeError deep in the rubric)."""

    default_rewards: ClassVar[list[str]] = ["broken_envs:parity_exact"]  # type: ignore[assignment]


class NoDescriptionEnv(ParityEnv):
    # deliberately no docstring and no description: it listed blank
    description = None  # type: ignore[assignment]
    __doc__ = None


class NoAnswerEnv(ParityEnv):
    """The verdict carries no ``answer``: algorithm.balance_answers did nothing, silently."""

    def check(self, task: Task, completion: str) -> Any:
        return {"correct": completion.strip() == task.reference["parity"]}


class OverlappingSplitsEnv(ParityEnv):
    """Every split draws the same prompts (the split is only a label)."""

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        tasks = []
        for i in range(n):
            number = random.Random(f"{seed}:{i}").randint(0, 10**6)
            messages = [{"role": "user", "content": f"is it even or odd? {number}"}]
            reference = {"parity": "even" if number % 2 == 0 else "odd"}
            tasks.append(
                Task(f"parity/{split}/{seed}/{i}", split, messages, reference, {"last_digit": number % 10})
            )
        return tasks


class NondeterministicEnv(ParityEnv):
    """Draws from the unseeded global RNG: other tasks on every call."""

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        salt = random.random()
        tasks = super().tasks(split, n, seed)
        return [
            Task(
                t.id,
                t.split,
                [{"role": "user", "content": f"{salt:.6f} {t.messages[0]['content']}"}],
                t.reference,
            )
            for t in tasks
        ]


class WeakOracleEnv(ParityEnv):
    """The oracle gets numbers ending in 0 wrong: below 100%."""

    def oracle(self, messages: list[Message]) -> Any:
        number = int(messages[-1]["content"].split()[-1])
        return "odd" if number % 10 == 0 else super().oracle(messages)


class TypedOutcomeEnv(ParityEnv):
    """Returns the typed verdict (the contract kept)."""

    def check(self, task: Task, completion: str) -> Any:
        answer = completion.strip() if completion.strip() in ("even", "odd") else None
        return Outcome(
            correct=answer == task.reference["parity"], answer=answer, extra={"length": len(completion)}
        )


class LeveledParityEnv(ParityEnv):
    """Takes one option, ``level`` (``--env-options '{"levl": ...}'`` must be one error, not a row each)."""

    def __init__(self, level: str = "easy") -> None:
        self.level = level


class MisplacedSevens(SkipsSevens):
    """Wrong on the 7s, but declares the 3s: its errors lie outside its weak_slices."""

    weak_slices: ClassVar[dict[str, tuple[Any, ...]]] = {"last_digit": (3,)}


class UndeclaredSevens(SkipsSevens):
    """Wrong on the 7s and declares no weak_slices."""

    weak_slices: ClassVar[dict[str, tuple[Any, ...]]] = {}


class MisdeclaredTeacherEnv(ParityEnv):
    """Its teacher's errors fall outside the slices its weak_slices names."""

    def teacher(self) -> Teacher:
        return MisplacedSevens()


class UndeclaredTeacherEnv(ParityEnv):
    """Its teacher errs but names no weak_slices."""

    def teacher(self) -> Teacher:
        return UndeclaredSevens()


class RaisingCheckEnv(ParityEnv):
    """``check`` raises on an answer it cannot parse (a canary) instead of judging it incorrect."""

    def check(self, task: Task, completion: str) -> Any:
        answer = {"even": "even", "odd": "odd"}[completion.strip()]  # KeyError on anything else
        return {"correct": answer == task.reference["parity"], "answer": answer}


class LongAnswerEnv(ParityEnv):
    """The oracle answers in a sentence longer than ``max_new_tokens``: the model can never emit it."""

    max_new_tokens = 2

    def oracle(self, messages: list[Message]) -> Any:
        return "the number you gave me is " + str(super().oracle(messages))

    def check(self, task: Task, completion: str) -> Any:
        words = completion.split()
        answer = words[-1] if words and words[-1] in ("even", "odd") else None
        return {"correct": answer == task.reference["parity"], "answer": answer}


class TwoTurns(Episode):
    """A preamble turn, then the answer (judged by the env's check)."""

    def __init__(self, task: Task, env: Env) -> None:
        super().__init__(task)
        self.env = env

    def step(self, action: str) -> Step:
        self.actions.append(action)
        if len(self.actions) == 1:
            return Step(observation="and the answer?", done=False)
        self.outcome = self.env.check(self.task, action)
        return Step(observation=None, done=True)


class MultiTurnLongEnv(ParityEnv):
    """Two turns: the oracle's first turn (a long preamble) is over the per-turn limit, its last is not."""

    max_turns = 2
    max_new_tokens = 4

    def episode(self, task: Task) -> Episode:
        return TwoTurns(task, self)

    def teacher(self) -> None:
        return None

    def oracle(self, messages: list[Message]) -> Any:
        if not any(m["role"] == "assistant" for m in messages):
            return "let me think about this number carefully, digit by digit"
        return super().oracle(messages[:-2])
