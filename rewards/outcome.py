"""Env-agnostic rewards that read the env's verdict (``Episode.outcome``) instead of parsing the completion.

For workflows whose outcome only the env can judge (a tool episode's final state, a query's result rows),
the env's ``check``/episode writes ``outcome["correct"]``; :func:`correct` turns it into a reward. An
episode that a turn or token limit ended carries the env's verdict of an unfinished episode (not correct).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rltk.reward import reward_fn


@reward_fn(range=(0.0, 1.0))
def correct(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """1 if the env judged the episode correct (``outcome["correct"] is True``), else 0.

    >>> correct("<answer>4</answer>", {}, {"correct": True})
    1.0
    >>> correct("", {}, {"correct": "yes"})  # only a real True counts
    0.0
    >>> correct("", {}, {})
    0.0
    """
    return 1.0 if outcome.get("correct") is True else 0.0
