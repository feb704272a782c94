"""The prompt text of ``policy_flagging``: the written policy and transaction, and reading them back.

The env writes a policy (:class:`Rules`) and one transaction as text (:func:`render`) under a system prompt
that asks for one answer format (:data:`SYSTEMS`). The oracle and the baselines read everything back from
the prompt alone (:func:`read`, :func:`violations`) and answer in the format it asks for (:func:`reply`),
after the check lines where it asks for a checklist (:func:`checks`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rltk_envs import money

from rltk.env import Message

RULES = ("R1", "R2", "R3")  # the policy at "basic" and "varied"
# at "combined": + R4, amount over a lower threshold AND a watch-listed destination
RULES_COMBINED = (*RULES, "R4")
_CHECK_LINES = {
    "R1": "R1: <amount> over <threshold>? yes/no",
    "R2": "R2: <destination> listed? yes/no",
    "R3": "R3: <count> over <limit>? yes/no",
    "R4": "R4: <amount> over <lower>, <destination> watch-listed? yes/no",
}


def _system(ask_rule: bool, checklist: bool, rules: tuple[str, ...]) -> str:
    """The system prompt asking for the answer format ``(ask_rule, checklist)`` under the policy ``rules``."""
    head = "You screen bank transactions against a policy. "
    if checklist:
        checks = "".join(_CHECK_LINES[r] + "\n" for r in rules)
        ask = "FLAG R<n> or CLEAR" if ask_rule else "FLAG or CLEAR"
        return f"{head}Check each rule on its own line, then decide:\n{checks}{ask}"
    ask = ", ".join(f"FLAG {r}" for r in rules) + " or CLEAR" if ask_rule else "FLAG or CLEAR"
    return f"{head}Reply with only {ask}."


# (ask_rule, checklist, rules) → system prompt; the prompt alone tells the oracle which answer format is asked
SYSTEMS = {
    (a, c, r): _system(a, c, r) for a in (True, False) for c in (False, True) for r in (RULES, RULES_COMBINED)
}


@dataclass(frozen=True)
class Rules:
    """A policy: R1-R3 (R4 where ``watch`` lists countries), amounts in cents."""

    threshold: int  # cents
    countries: tuple[str, ...]
    limit: int
    window: str  # "1h" | "24h"
    lower: int = 0  # R4 ("combined" only): amount over ``lower`` cents to a ``watch`` country
    watch: tuple[str, ...] = ()  # empty: no R4

    @property
    def ids(self) -> tuple[str, ...]:
        """The policy's rule ids, R1..R3 or R1..R4."""
        return RULES_COMBINED if self.watch else RULES

    def broken(self, amount: int, country: str, counts: dict[str, int]) -> list[bool]:
        """Whether each rule of :attr:`ids` is broken by the transaction, in order."""
        broken = [amount > self.threshold, country in self.countries, counts.get(self.window, 0) > self.limit]
        return [*broken, amount > self.lower and country in self.watch] if self.watch else broken


def _either(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1]


def _names(text: str) -> tuple[str, ...]:
    return tuple(re.split(r", | or ", text.strip()))


def render(
    rules: Rules, amount: int, country: str, counts: dict[str, int], merchants: list[str], rng: random.Random
) -> str:
    """The user turn: the policy, then the transaction (its id, account and merchant drawn from ``rng``)."""
    lines = [
        "Policy (flag if any rule is broken):",
        f"R1: amount over {money(rules.threshold, always_cents=False)}",
        f"R2: destination is {_either(rules.countries)}",
        f"R3: more than {rules.limit} transactions in the last {rules.window}",
    ]
    if rules.watch:
        lower = money(rules.lower, always_cents=False)
        lines.append(f"R4: amount over {lower} and destination is {_either(rules.watch)}")
    lines += [
        "",
        f"Transaction TX-{rng.randrange(10**6):06d}",
        f"Amount: {money(amount)}",
        f"From: acct {rng.randrange(10**4):04d}-{rng.randrange(10**4):04d}",
        f"To: {country}",
        f"Merchant: {rng.choice(merchants)}",
    ]
    lines += [f"Transactions in last {w}: {c}" for w, c in counts.items()]
    return "\n".join(lines)


def read(messages: list[Message]) -> tuple[Rules, int, str, dict[str, int]]:
    """Parse policy and transaction from the prompt text alone: (rules, amount cents, country, counts)."""
    text = "\n".join(m["content"] for m in messages)

    def cents(s: str) -> int:
        return round(float(s.replace(",", "")) * 100)

    r1 = re.search(r"R1: amount over \$([\d,]+(?:\.\d\d)?)", text)
    r2 = re.search(r"R2: destination is (.+)", text)
    r3 = re.search(r"R3: more than (\d+) transactions in the last (\w+)", text)
    r4 = re.search(r"R4: amount over \$([\d,]+(?:\.\d\d)?) and destination is (.+)", text)
    amount = re.search(r"Amount: \$([\d,]+\.\d\d)", text)
    to = re.search(r"To: (.+)", text)
    if not (r1 and r2 and r3 and amount and to):
        raise ValueError("prompt is not a policy_flagging task")
    lower, watch = (cents(r4.group(1)), _names(r4.group(2))) if r4 else (0, ())
    rules = Rules(cents(r1.group(1)), _names(r2.group(1)), int(r3.group(1)), r3.group(2), lower, watch)
    counts = {w: int(c) for w, c in re.findall(r"Transactions in last (\w+): (\d+)", text)}
    return rules, cents(amount.group(1)), to.group(1).strip(), counts


def asked_format(messages: list[Message]) -> tuple[bool, bool]:
    """(ask_rule, checklist): the answer format the prompt's system message asks for."""
    for (ask_rule, checklist, _), system in SYSTEMS.items():
        if messages[0]["content"] == system:
            return ask_rule, checklist
    return True, False


def asks_rule(messages: list[Message]) -> bool:
    """Whether the prompt asks for the broken rule (``FLAG R<n>``) or the decision alone."""
    return asked_format(messages)[0]


def flag(rule: str, messages: list[Message]) -> str:
    """A flag of ``rule`` as the prompt asks for it: ``FLAG R<n>``, or ``FLAG`` for the decision alone."""
    return f"FLAG {rule}" if asks_rule(messages) else "FLAG"


def reply(answer: str, messages: list[Message]) -> str:
    """``answer`` in the format the prompt asks for: after the check lines where it asks for a checklist."""
    return "\n".join([*checks(messages), answer]) if asked_format(messages)[1] else answer


def checks(messages: list[Message]) -> list[str]:
    """The check lines of a checklist answer (one per rule), read from the prompt text as the oracle does."""
    rules, amount, country, counts = read(messages)
    yn = ["yes" if b else "no" for b in rules.broken(amount, country, counts)]
    shown, threshold, lower = money(amount), *(money(c, False) for c in (rules.threshold, rules.lower))
    lines = [
        f"R1: {shown} over {threshold}? {yn[0]}",
        f"R2: {country} listed? {yn[1]}",
        f"R3: {counts.get(rules.window, 0)} over {rules.limit}? {yn[2]}",
        f"R4: {shown} over {lower}, {country} watch-listed? {yn[-1]}",
    ]
    return lines[: len(yn)]


def violations(messages: list[Message]) -> list[str]:
    """The ids of the rules the prompt's transaction breaks, in policy order (read as the oracle does)."""
    rules, amount, country, counts = read(messages)
    return [r for r, b in zip(rules.ids, rules.broken(amount, country, counts), strict=True) if b]
