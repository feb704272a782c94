"""Rewards for the policy-flagging workflow (``rltk_envs.policy_flagging``), and its one answer parser.

What is rewarded: the flag/clear decision, cost-weighted (:func:`flag_decision`); naming the broken rule on a
flagged transaction (:func:`flag_rule`); answering in the exact requested format (:func:`answer_format`).
Every function parses the completion with :func:`answer_of`, which the env's verdict
(``PolicyFlaggingEnv.check``) uses too: one parser for env and rewards. An unparseable completion (empty, a
hedge, prose, an echo of the prompt) scores the function's range minimum, never above a well-formed wrong
answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from rltk.reward import reward_fn

_MONEY = r"\$[\d,]+(?:\.\d\d)?"
_CHECKS = (  # one check line per rule, R1..R4
    re.compile(rf"R1:\s*{_MONEY}\s+over\s+{_MONEY}\s*\?\s*(yes|no)", re.IGNORECASE),
    re.compile(r"R2:\s*[^\n?]+?\s+listed\s*\?\s*(yes|no)", re.IGNORECASE),
    re.compile(r"R3:\s*\d+\s+over\s+\d+\s*\?\s*(yes|no)", re.IGNORECASE),
    re.compile(
        rf"R4:\s*{_MONEY}\s+over\s+{_MONEY}\s*,\s*[^\n?]+?\s+watch-listed\s*\?\s*(yes|no)", re.IGNORECASE
    ),
)
_CANONICAL = re.compile(r"FLAG R[1-4]|CLEAR")
_CANONICAL_DECISION = re.compile(r"FLAG|CLEAR")
_LOOSE = re.compile(r"(FLAG)(?:\s*[:\-,(]?\s*(R[1-4])\s*\)?)?|(CLEAR)", re.IGNORECASE)
_LABEL = re.compile(r"^(?:final\s+)?(?:answer|decision)\s*[:\-]\s*", re.IGNORECASE)
_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


class Answer(NamedTuple):
    """A parsed reply: ``decision`` is ``"FLAG"``/``"CLEAR"`` (None = unparseable), ``exact`` = canonical."""

    decision: str | None
    rule: str | None
    exact: bool


def parse_answer(text: str, ask_rule: bool = True, checklist: bool = False, n_rules: int = 3) -> Answer:
    r"""Parse a reply, tolerant of case, whitespace, ``<answer>`` tags, markdown emphasis, end punctuation.

    The whole reply must be the answer: prose, a hedge (both decisions, several rules) or junk around it is a
    parse failure. ``exact`` is True only for the requested format, ``FLAG R<n>`` or ``CLEAR`` (outer
    whitespace aside); with ``ask_rule=False``, ``FLAG`` or ``CLEAR``. ``R4`` is a rule id everywhere, named
    in prompts only at ``difficulty="combined"``. With ``checklist=True`` the reply must be the ``n_rules``
    check lines (``R1: $<amount> over $<threshold>? yes|no``, ``R2: <country> listed? yes|no``,
    ``R3: <count> over <limit>? yes|no``, with 4 rules ``R4: $<amount> over $<lower>, <country> watch-listed?
    yes|no``, in this order) and then the answer on a line of its own; anything else, a missing check line
    included, is a parse failure. The check lines are not graded: the decision is.

    >>> parse_answer(" flag: r2. ")
    Answer(decision='FLAG', rule='R2', exact=False)
    >>> parse_answer("FLAG R4")
    Answer(decision='FLAG', rule='R4', exact=True)
    >>> parse_answer("CLEAR")
    Answer(decision='CLEAR', rule=None, exact=True)
    >>> parse_answer("FLAG R1 or CLEAR").decision is None
    True
    >>> parse_answer("FLAG", ask_rule=False)
    Answer(decision='FLAG', rule=None, exact=True)
    >>> parse_answer("R1: $12.00 over $5,000? no\nR2: Iran listed? yes\nR3: 3 over 10? no\nFLAG", False, True)
    Answer(decision='FLAG', rule=None, exact=True)
    >>> parse_answer("FLAG", ask_rule=False, checklist=True).decision is None  # the checks are missing
    True
    """
    if not isinstance(text, str):
        return Answer(None, None, False)
    if checklist:
        return _parse_checklist(text, ask_rule, n_rules)
    tags = _TAG.findall(text)
    body = tags[0] if len(tags) == 1 else text if not tags else ""
    body = _LABEL.sub("", body.strip().strip("*_`\"' ")).rstrip(".!;, *_`\"'").strip()
    m = _LOOSE.fullmatch(body)
    if not m:
        return Answer(None, None, False)
    exact = (_CANONICAL if ask_rule else _CANONICAL_DECISION).fullmatch(text.strip()) is not None
    if m.group(3):
        return Answer("CLEAR", None, exact)
    return Answer("FLAG", m.group(2).upper() if m.group(2) else None, exact)


def _parse_checklist(text: str, ask_rule: bool, n_rules: int) -> Answer:
    """The checklist format of :func:`parse_answer`: ``n_rules`` check lines, then the answer."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    checks = _CHECKS[:n_rules]
    if len(lines) != len(checks) + 1 or not all(
        c.fullmatch(line) for c, line in zip(checks, lines, strict=False)
    ):
        return Answer(None, None, False)
    ans = parse_answer(lines[-1], ask_rule)
    exact = (
        ans.exact
        and "\n".join(lines) == text.strip()
        and all(line.endswith(("? yes", "? no")) for line in lines[:-1])
    )
    return Answer(ans.decision, ans.rule, exact)


def answer_of(completion: str, reference: Mapping[str, Any]) -> Answer:
    """Parse a completion in the format its task asked for (``reference["ask_rule"]``/``["checklist"]``).

    ``reference["n_rules"]`` (absent: 3) is the number of check lines a checklist answer must have.
    """
    return parse_answer(
        completion,
        reference.get("ask_rule", True),
        reference.get("checklist", False),
        reference.get("n_rules", 3),
    )


@reward_fn(range=lambda miss_cost, false_alarm_cost: (-max(miss_cost, false_alarm_cost, 0.0), 1.0))
def flag_decision(
    completion: str,
    reference: Mapping[str, Any],
    outcome: Mapping[str, Any],
    miss_cost: float = 1.0,
    false_alarm_cost: float = 1.0,
) -> float:
    """Cost-weighted decision: 1 if right, ``-miss_cost`` if a flag is missed, ``-false_alarm_cost`` if false.

    The declared range is ``[-max(miss_cost, false_alarm_cost), 1]`` for the call's costs (``reward_range``,
    for the defaults, is ``(-1, 1)``). Unparseable → the range minimum, ``-max(miss_cost, false_alarm_cost)``.

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
