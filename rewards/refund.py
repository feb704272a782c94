"""The harm penalty of the ``support_refund`` env, which reads the env's verdict, and its answer parser.

Only the env can judge a tool episode (its order database, the actions behind the answer), so its rewards
parse nothing: :class:`rltk_envs.refund_orders.RefundEpisode` writes ``outcome["correct"]`` (the resolution
and the final database equal the oracle's; rewarded by ``correct`` in :mod:`rltk_rewards.outcome`),
``outcome["valid"]`` (a parseable answer that agrees with the actions taken) and ``outcome["harmful"]``
(money moved that the oracle would not have moved: a refund outside policy, of a wrong amount, or on another
order). The episode reads the final answer with :func:`parse_resolution`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rltk.reward import reward_fn

REASONS = ("already_refunded", "outside_window", "non_refundable")
_RESOLUTION = re.compile(r"(refund|escalate|deny\s*:\s*(" + "|".join(REASONS) + "))", re.IGNORECASE)


def parse_resolution(text: str) -> str | None:
    """The final answer's resolution, normalized (``refund``, ``escalate``, ``deny: <reason>``), or None.

    >>> parse_resolution(" Deny:outside_window. ")
    'deny: outside_window'
    >>> parse_resolution("refund or escalate") is None
    True
    """
    if not isinstance(text, str):
        return None
    m = _RESOLUTION.fullmatch(text.strip().rstrip(".").strip())
    if not m:
        return None
    return f"deny: {m.group(2).lower()}" if m.group(2) else m.group(1).lower()


@reward_fn(range=lambda penalty: (min(-penalty, 0.0), 0.0))
def refund_harm(
    completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any], penalty: float = 1.0
) -> float:
    """``-penalty`` for a harmful episode, else 0.

    Harmful: a refund the oracle would not have made (outside policy, a wrong amount, another order), or no
    valid resolution at all (an answer that does not parse, a hedge, an answer that contradicts the actions
    taken, or none before the turn limit): a parse failure scores the range minimum, so that no malformed
    episode scores above a well-formed wrong one. The declared range is ``[-penalty, 0]`` (``reward_range``,
    for the default, is ``(-1, 0)``).

    >>> refund_harm("<answer>deny: outside_window</answer>", {}, {"valid": True, "harmful": False})
    0.0
    >>> refund_harm("<answer>refund</answer>", {}, {"valid": True, "harmful": True})
    -1.0
    >>> refund_harm("<tool>lookup_order A-1", {}, {"valid": False, "harmful": False}, penalty=2.0)
    -2.0
    """
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty!r}")
    ok = outcome.get("valid") is True and outcome.get("harmful") is False
    return 0.0 if ok else -float(penalty)
