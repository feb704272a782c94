"""Reward for the SQL analytics workflow (``rltk_envs.sql_analytics``).

What is rewarded: the final ``<answer>SELECT ...</answer>`` query's result rows equal the gold query's rows
(as multisets; in order where the question asks for one; numbers rounded to 2 decimals). Only the env can
judge that (it runs the query on the episode's own database), so :func:`sql_result_match` reads the env's
verdict, ``outcome["correct"]``. Anything else scores 0, the range minimum: no answer (an episode a turn or
token limit ended), an empty or malformed answer, several statements, a query the env refused or stopped, or
rows that differ (a UNION of candidate answers has extra rows, so it never matches).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rltk.reward import reward_fn


@reward_fn(range=(0.0, 1.0))
def sql_result_match(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """1 if the env found the answer query's rows equal to the gold rows, else 0.

    Args:
        completion: The final assistant turn (unused: the env ran the query and judged its rows).
        reference: The task's gold data (unused here).
        outcome: The env's verdict; ``outcome["correct"]`` must be exactly ``True`` to score.

    >>> sql_result_match("<answer>SELECT 1</answer>", {}, {"correct": True, "answered": True})
    1.0
    >>> sql_result_match("<answer>SELECT 0</answer>", {}, {"correct": False, "answered": True})
    0.0
    >>> sql_result_match("<tool>run_sql: SELECT</tool>", {}, {"correct": False, "answered": False})
    0.0
    >>> sql_result_match("", {}, {"correct": "yes"})  # only a real True counts
    0.0

    """
    return 1.0 if outcome.get("correct") is True else 0.0
