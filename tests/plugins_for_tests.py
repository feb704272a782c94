"""Plugins that tests load through the ``pkg.module:name`` form (tests/ is on sys.path / PYTHONPATH)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rltk.reward import reward_fn


@reward_fn(range=(0.0, 1.0))
def vowel_share(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """Share of vowels in the completion: varies on a random model's output, so advantages are non-zero.

    >>> vowel_share("aab", {}, {})
    0.6666666666666666
    """
    letters = [c for c in completion.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0
