"""The reward: 1 for exactly the ticket's team, else 0."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rltk.reward import reward_fn
from ticket_triage.env import parse_team


@reward_fn(range=(0.0, 1.0))
def ticket_triage_team(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """1 if the completion is exactly the ticket's team; a hedge, padding or echo parses as nothing: 0.

    >>> ticket_triage_team(" billing", {"team": "billing"}, {})
    1.0
    >>> ticket_triage_team("billing or shipping", {"team": "billing"}, {})
    0.0
    """
    return 1.0 if parse_team(completion) == reference["team"] else 0.0
