"""Plugins that tests load through the ``pkg.module:name`` form (tests/ is on sys.path / PYTHONPATH)."""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Mapping
from typing import Any, ClassVar

from rltk.env import Env, Episode, Message, Task
from rltk.reward import reward_fn
from rltk.tools import STOP_STRINGS, FinalAnswer, ToolEpisode, parse_action, protocol_prompt


@reward_fn(range=(0.0, 1.0))
def vowel_share(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """Share of vowels in the completion: varies on a random model's output, so advantages are non-zero.

    >>> vowel_share("aab", {}, {})
    0.6666666666666666
    """
    letters = [c for c in completion.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0


class CounterToolEnv(Env):
    """A 3-turn tool env for engine tests: a per-episode counter behind ``<tool>add: n</tool>``.

    The answer is the counter's value after adding the task's numbers; the oracle adds them one call per
    turn and then answers. ``stop_strings`` adds ``"a"`` so that a random model's turns end at ragged
    lengths, often in the middle of a token (``"ation"`` contains the stop string at its first character).
    """

    name = "counter_tool"
    description = "Engine test env: add numbers with a stateful tool, answer the total."
    max_turns = 3
    stop_strings = (*STOP_STRINGS, "a")
    default_rewards: ClassVar[dict[str, float]] = {"correct": 1.0}

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        out = []
        for i in range(n):
            numbers = [(seed * 7 + i * 3 + k) % 10 for k in range(1 + i % 2)]
            text = "Add " + " and ".join(map(str, numbers)) + " with the add tool, one call per turn."
            system = "You use tools.\n" + protocol_prompt({"add": "add(n): add n to the counter; returns it"})
            messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
            out.append(Task(f"counter/{split}/{seed}/{i}", split, messages, {"total": sum(numbers)}))
        return out

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        parsed = parse_action(completion)
        return {"correct": isinstance(parsed, FinalAnswer) and parsed.text == str(task.reference["total"])}

    def episode(self, task: Task) -> Episode:
        counter = {"value": 0}  # this episode's own state

        def add(argument: str) -> str:
            counter["value"] += int(argument)  # a non-number raises: the episode answers <error>
            return str(counter["value"])

        def judge(answer: str) -> dict[str, Any]:
            return {"correct": answer == str(task.reference["total"]), "counter": counter["value"]}

        return ToolEpisode(task, {"add": add}, judge)

    def oracle(self, messages: list[Message]) -> str:
        numbers = re.findall(r"\d+", messages[1]["content"])
        results = re.findall(r"<result>(\d+)</result>", " ".join(m["content"] for m in messages[2:]))
        if len(results) < len(numbers):
            return f"<tool>add: {numbers[len(results)]}</tool>"
        return f"<answer>{results[-1]}</answer>"


@reward_fn(range=(0.0, 1.0))
def buggy(
    completion: str,
    reference: Mapping[str, Any],
    outcome: Mapping[str, Any],
    share: float = 0.5,
    how: str = "raise",
) -> float:
    """A buggy reward: fails on about ``share`` of completions (by a hash of the text), else scores 1.

    It divides by zero (``how="raise"``), or gets stuck in C code where no signal can reach it
    (``how="hang"``).

    >>> buggy("x", {}, {}, share=0.0)
    1.0
    """
    if zlib.crc32(completion.encode()) % 1000 < share * 1000:
        if how == "hang":
            sum(itertools.repeat(0))
        return 1 / 0
    return 1.0
