"""Plugins for tests/test_reward_contract.py, loaded as ``contract_plugins:name`` (tests/ is on the path).

``BoxedSumEnv`` gives tasks whose reference holds a ``ground_truth`` field, the column TRL's documented
reward (tests/trl_doc_rewards/example3.py) reads; the rewards are the per-sample forms the contract accepts,
and signatures it must refuse at validation.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from rltk.env import Env, Message, Task, draw_task
from rltk.reward import reward_fn

_BOXED = re.compile(r"\\boxed\{(.*?)\}")


class BoxedSumEnv(Env):
    """Single-turn sums answered in ``\\boxed{}``; the reference's ``ground_truth`` is the sum as text."""

    name = "boxed_sum"
    description = "Test env: add two numbers, answer in \\boxed{}."
    max_new_tokens = 16
    default_rewards: ClassVar[dict[str, float]] = {"correct": 1.0}

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        seen: set[str] = set()
        out = []
        for i in range(n):

            def draw(attempt: int, i: int = i) -> Task:
                rng = random.Random(f"{seed}/{i}/{attempt}")
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                messages = [
                    {"role": "system", "content": "You add numbers. Put the answer in \\boxed{}."},
                    {"role": "user", "content": f"What is {a} + {b}?"},
                ]
                return Task(f"boxed_sum/{split}/{seed}/{i}", split, messages, {"ground_truth": str(a + b)})

            out.append(draw_task(split, seen, draw))
        return out

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        found = _BOXED.findall(completion)
        return {"correct": found == [task.reference["ground_truth"]]}

    def oracle(self, messages: list[Message]) -> str:
        a, b = (int(x) for x in re.findall(r"\d+", messages[-1]["content"]))
        return f"The answer is \\boxed{{{a + b}}}."


@reward_fn(range=(0.0, 1.0), version="2.0", description="The completion is non-empty (keywords only).")
def nonempty(completion: str, **_: Any) -> float:
    """1 when the completion has any non-space text."""
    return 1.0 if completion.strip() else 0.0


def by_reference(completion: str, reference: Mapping[str, Any]) -> float:
    """1 when the completion holds the reference's ``ground_truth`` (takes no outcome)."""
    return 1.0 if str(reference["ground_truth"]) in completion else 0.0


def reads_prompt(completion: str, *, prompt: Any, outcome: Mapping[str, Any], scale: float = 1.0) -> float:
    """``scale`` when the completion is not an echo of the prompt and the env judged it correct."""
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return scale if completion != text and outcome.get("correct") is True else 0.0


@reward_fn(range=(0.0, 1.0))
def messages_len(completion: Any, **_: Any) -> float:
    """A reward written for messages: 1 when the conversation has one message (text: its length > 1)."""
    return 1.0 if len(completion) == 1 else 0.0


@reward_fn(range=(0.0, 1.0))
def batch_with_params(
    prompts: list[Any], completions: list[Any], outcome: list[Any], bonus: float = 0.0
) -> list:
    """Batch form without ``**kwargs``: 1 (+ bonus, capped) when judged correct, None for empty prompts."""
    return [
        None if not p else min(1.0, float(o.get("correct") is True) + bonus)
        for p, o in zip(prompts, outcome, strict=True)
    ]


def batch_wrong_length(completions: list[str], **kwargs: Any) -> list[float]:
    """A batch reward bug: one score too few for groups of more than one."""
    return [1.0] * max(1, len(completions) - 1)


def batch_bad_entry(completions: list[str], **kwargs: Any) -> list[Any]:
    """A batch reward bug on some entries: a string where a number belongs, for empty completions."""
    return ["zero" if not c.strip() else 1.0 for c in completions]


def wrong_signature(
    completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any], threshold: float
) -> float:
    """A required param no recipe gives."""
    return float(len(completion) > threshold)


def wrong_column(completions: list[str], solution: list[str], **kwargs: Any) -> list[float]:
    """TRL's accuracy-reward shape: needs a ``solution`` column the env's tasks do not have."""
    return [float(c == s) for c, s in zip(completions, solution, strict=True)]


def constant(completion: str, **_: Any) -> float:
    """The same score for everything: no signal."""
    return 0.5


def keyword_hit(completion: str, reference: Mapping[str, Any], **_: Any) -> float:
    """Hackable: 1 when the gold answer appears anywhere (so a hedge or a padded answer scores 1)."""
    return 1.0 if str(reference["ground_truth"]) in completion else 0.0


def batch_fails_on_odd(
    completions: list[str], ground_truth: list[str], how: str = "raise", **kwargs: Any
) -> list:
    """A batch reward bug on groups whose task's sum is odd: it raises, or hangs past any deadline."""
    if int(ground_truth[0]) % 2:
        if how == "hang":
            time.sleep(60)
        raise ValueError("odd sum")
    return [1.0] * len(completions)
