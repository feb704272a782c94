"""Scoring of the ``reasoning_gym`` env: reasoning-gym's own answer extraction and ``score_answer``.

One scoring path, shared by :meth:`rltk_envs.reasoning_gym.ReasoningGymEnv.check` and the reward
:func:`reasoning_gym_score`, and the same as reasoning-gym's own evaluation (``eval/eval.py`` in its
repository), so a score here compares with anyone else's on the same generator, config and seed:

1. ``reasoning_gym.utils.extract_answer(completion)``: the text of the *last* ``<answer>…</answer>``,
   stripped; ``None`` when the completion has no such pair;
2. ``dataset.score_answer(answer, entry)`` of a dataset built like the task's (``create_dataset(task,
   seed=, size=, **config)``), on the task's entry (question, answer, metadata) as the generator made it.

A ``score_answer`` that raises on a malformed answer scores 0.0, as in reasoning-gym's evaluation (model
output is untrusted; the error text goes into the env's verdict). A task counts as correct only at a score of
1.0.

The reasoning-gym package is an optional extra (``pip install 'rltk[reasoning]'``): it is imported on first
use, so that listing plugins, and this module's import, work without it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from rltk.reward import reward_fn

RG_VERSION = "0.1.25"  # the version pinned by rltk's `reasoning` extra (pyproject.toml)
INSTALL_HINT = f"pip install 'rltk[reasoning]' (reasoning-gym=={RG_VERSION})"


def import_reasoning_gym() -> ModuleType:
    """The ``reasoning_gym`` package.

    Raises:
        ImportError: If it is not installed, naming the extra that installs it.

    """
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ImportError(f"the reasoning_gym env needs the reasoning-gym package: {INSTALL_HINT}") from exc
    return reasoning_gym


@functools.lru_cache(maxsize=32)
def _dataset(task: str, config_json: str, seed: int, size: int) -> Any:
    # Cached per process: a dataset is stateless once built (entries come from seed + index), and some
    # generators precompute in their constructor (acre: about 1.6 s for 10,000 entries). Reward workers are
    # forked from the trainer, so they inherit the datasets the env built.
    rg = import_reasoning_gym()
    return rg.create_dataset(task, seed=seed, size=size, **json.loads(config_json))


def make_dataset(task: str, config: Mapping[str, Any], seed: int, size: int) -> Any:
    """``reasoning_gym.create_dataset(task, seed=seed, size=size, **config)``, cached per process."""
    return _dataset(task, json.dumps(dict(config), sort_keys=True), int(seed), int(size))


def dataset_of(reference: Mapping[str, Any]) -> Any:
    """The dataset a task's entry came from (``reference`` of a ``reasoning_gym`` task)."""
    return make_dataset(reference["task"], reference["config"], reference["seed"], reference["size"])


def render_answer(answer: str) -> str:
    """An answer in reasoning-gym's answer format.

    >>> render_answer("42")
    '<answer>42</answer>'
    """
    return f"<answer>{answer}</answer>"


@dataclass(frozen=True)
class Scored:
    """One completion scored by reasoning-gym.

    Attributes:
        answer: What ``extract_answer`` read (None: no ``<answer>…</answer>`` in the completion).
        score: ``score_answer(answer, entry)`` as a float; 0.0 where it raised.
        error: The exception ``score_answer`` raised (type and message), else None.

    """

    answer: str | None
    score: float
    error: str | None = None


def extract(completion: Any) -> str | None:
    """reasoning-gym's ``extract_answer`` of a completion; None for anything but a string."""
    if not isinstance(completion, str):
        return None
    from reasoning_gym.utils import extract_answer

    return extract_answer(completion)


def score_completion(completion: Any, reference: Mapping[str, Any]) -> Scored:
    """Score ``completion`` exactly as reasoning-gym's evaluation does (see the module docstring).

    Raises:
        ImportError: If reasoning-gym is not installed.
        ValueError: If the reference's task or config cannot build a dataset (a bug of the task, not of the
            completion; the env validates both when it is built).

    """
    answer = extract(completion)
    dataset = dataset_of(reference)
    try:
        score = float(dataset.score_answer(answer, reference["entry"]))
    except Exception as exc:  # a scorer tripping over malformed model output: reasoning-gym's eval scores 0
        return Scored(answer, 0.0, f"{type(exc).__name__}: {exc}"[:500])
    return Scored(answer, score)


def is_correct(score: float) -> bool:
    """A task counts as correct only at a score of exactly 1.0 (partial credit is not a pass).

    >>> is_correct(1.0), is_correct(0.999), is_correct(float("nan"))
    (True, False, False)
    """
    return math.isfinite(score) and score == 1.0


@reward_fn(range=(0.0, 1.0))
def reasoning_gym_score(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """reasoning-gym's own ``score_answer`` of the completion's last ``<answer>…</answer>`` (0 without one).

    Scores the completion from the task's reference (its entry and dataset), not from the env's verdict, so
    it stands on its own; it equals the verdict's ``score``. Partial credit is the generator's own (e.g.
    ``basic_arithmetic`` gives len(gold) / len(answer) to an answer that contains the gold one).
    """
    return score_completion(completion, reference).score
