"""Rewards for the policy-flagging workflow (``rltk_envs.policy_flagging``).

What is rewarded: the flag/clear decision, cost-weighted (:func:`flag_decision`); naming the broken rule on a
flagged transaction (:func:`flag_rule`); answering in the exact requested format (:func:`answer_format`).
Every function parses the completion with the env's own :func:`~rltk_envs.policy_flagging.answer_of`
(one parser for env and rewards). An unparseable completion (empty, a hedge, prose, an echo of the prompt)
scores the function's range minimum, never above a well-formed wrong answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rltk_envs.policy_flagging import answer_of

from rltk.reward import reward_fn


@reward_fn(range=(-1.0, 1.0))
def flag_decision(
    completion: str,
    reference: Mapping[str, Any],
    outcome: Mapping[str, Any],
    miss_cost: float = 1.0,
    false_alarm_cost: float = 1.0,
) -> float:
    """Cost-weighted decision: 1 if right, ``-miss_cost`` if a flag is missed, ``-false_alarm_cost`` if false.

    The range is ``[-max(miss_cost, false_alarm_cost), 1]``; the declared ``reward_range`` ``(-1, 1)`` is the
    one for the default costs (scores are not clamped to it: the costs are the point). Unparseable → the
    range minimum, ``-max(miss_cost, false_alarm_cost)``.

    Args:
        completion: The model's final answer.
        reference: ``{"label": "FLAG" | "CLEAR", "rule": ...}``.
        outcome: The env's verdict (unused: the completion is parsed here).
        miss_cost: Cost (>= 0) of answering CLEAR when the gold label is FLAG.
        false_alarm_cost: Cost (>= 0) of answering FLAG when the gold label is CLEAR.

    >>> flag_decision("FLAG R2", {"label": "FLAG", "rule": "R2"}, {})
    1.0
    >>> flag_decision("CLEAR", {"label": "FLAG", "rule": "R2"}, {}, miss_cost=5.0)
    -5.0
    >>> flag_decision("FLAG R1 or CLEAR", {"label": "CLEAR", "rule": None}, {}, miss_cost=5.0)
    -5.0

    """
    if miss_cost < 0 or false_alarm_cost < 0:
        raise ValueError(
            f"costs must be >= 0, got miss_cost={miss_cost}, false_alarm_cost={false_alarm_cost}"
        )
    decision = answer_of(completion, reference).decision
    if decision is None:
        return -float(max(miss_cost, false_alarm_cost))
    if decision == reference["label"]:
        return 1.0
    return -float(miss_cost) if reference["label"] == "FLAG" else -float(false_alarm_cost)


@reward_fn(range=(0.0, 1.0))
def flag_rule(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float | None:
    """1 if a flagged transaction is flagged with the rule it breaks, else 0; None if the gold label is CLEAR.

    >>> flag_rule("FLAG R3", {"label": "FLAG", "rule": "R3"}, {})
    1.0
    >>> flag_rule("FLAG", {"label": "FLAG", "rule": "R3"}, {})
    0.0
    >>> flag_rule("CLEAR", {"label": "CLEAR", "rule": None}, {}) is None
    True
    >>> flag_rule("FLAG", {"label": "FLAG", "rule": "R3", "ask_rule": False}, {}) is None  # rule not asked
    True
    """
    if reference["label"] != "FLAG" or not reference.get("ask_rule", True):
        return None
    ans = answer_of(completion, reference)
    return 1.0 if ans.decision == "FLAG" and ans.rule == reference["rule"] else 0.0


@reward_fn(range=(0.0, 1.0))
def answer_format(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    r"""1 if the reply is exactly the requested format, right or wrong; else 0.

    The format is ``FLAG R<n>`` or ``CLEAR`` (outer whitespace aside), or ``FLAG``/``CLEAR`` where the task
    asks for the decision alone (``reference["ask_rule"]`` False).

    >>> answer_format("CLEAR\n", {"label": "FLAG", "rule": "R1"}, {})
    1.0
    >>> answer_format("flag r1.", {"label": "FLAG", "rule": "R1"}, {})
    0.0
    >>> answer_format("FLAG", {"label": "FLAG", "rule": "R1", "ask_rule": False}, {})
    1.0
    """
    return 1.0 if answer_of(completion, reference).exact else 0.0
