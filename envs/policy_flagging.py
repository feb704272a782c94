"""Policy-compliance transaction flagging: the first vertical env.

Workflow: a compliance analyst screens one bank transaction against a short written policy of three rules,
R1 (amount over a threshold), R2 (destination on a sanctioned-country list) and R3 (more than N transactions
in a time window), plus at ``difficulty="combined"`` a fourth that combines two conditions, R4 (amount over
a lower threshold AND destination on a watch list of 2-3 countries, disjoint from R2's), and answers
``FLAG R<n>`` naming the first broken rule, or ``CLEAR`` (with ``ask_rule=False``: ``FLAG`` or ``CLEAR``, the
decision alone). Rewarded (``rltk_rewards.flagging``): the decision, cost-weighted (a missed flag and a false
alarm may cost differently), naming the right rule, and answering in the exact format.

Eval/test are balanced: half the tasks break exactly one rule (equal numbers per rule), half break none, and
half of those are near misses (amount just under or at the threshold, a look-alike country, velocity exactly
at the limit; for R4, exactly one of its two conditions: a watch-listed destination with the amount at or
just under the lower threshold, or an amount over it to an unlisted watch-list candidate).
``difficulty="basic"`` keeps the policy fixed; ``"varied"`` draws thresholds, country list, limit and window
per task; ``"combined"`` is ``"varied"`` plus R4, its lower threshold and watch list drawn per task. The
policy is always written in the prompt, so the task stays solvable from the text.
:func:`parse_answer` is the one answer parser, shared by :meth:`PolicyFlaggingEnv.check` and the rewards.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from rltk.env import SPLITS, Env, Message, Policy, Task, draw_task

RULES = ("R1", "R2", "R3")  # the policy at "basic" and "varied"
# at "combined": + R4, amount over a lower threshold AND a watch-listed destination
RULES_COMBINED = (*RULES, "R4")
DIFFICULTIES = ("basic", "varied", "combined")
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


def answer_of(completion: str, reference: dict[str, Any]) -> Answer:
    """Parse a completion in the format its task asked for (``reference["ask_rule"]``/``["checklist"]``).

    ``reference["n_rules"]`` (absent: 3) is the number of check lines a checklist answer must have.
    """
    return parse_answer(
        completion,
        reference.get("ask_rule", True),
        reference.get("checklist", False),
        reference.get("n_rules", len(RULES)),
    )


@cache
def _data() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "data" / "policy_flagging.json").read_text())


@dataclass(frozen=True)
class _Rules:
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


def _money(cents: int, always_cents: bool = True) -> str:
    dollars = f"${cents // 100:,}"
    return dollars if (cents % 100 == 0 and not always_cents) else f"{dollars}.{cents % 100:02d}"


def _render(rules: _Rules, amount: int, country: str, counts: dict[str, int], rng: random.Random) -> str:
    lines = [
        "Policy (flag if any rule is broken):",
        f"R1: amount over {_money(rules.threshold, always_cents=False)}",
        f"R2: destination is {_either(rules.countries)}",
        f"R3: more than {rules.limit} transactions in the last {rules.window}",
    ]
    if rules.watch:
        lower = _money(rules.lower, always_cents=False)
        lines.append(f"R4: amount over {lower} and destination is {_either(rules.watch)}")
    lines += [
        "",
        f"Transaction TX-{rng.randrange(10**6):06d}",
        f"Amount: {_money(amount)}",
        f"From: acct {rng.randrange(10**4):04d}-{rng.randrange(10**4):04d}",
        f"To: {country}",
        f"Merchant: {rng.choice(_data()['merchants'])}",
    ]
    lines += [f"Transactions in last {w}: {c}" for w, c in counts.items()]
    return "\n".join(lines)


def _read(messages: list[Message]) -> tuple[_Rules, int, str, dict[str, int]]:
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
    rules = _Rules(cents(r1.group(1)), _names(r2.group(1)), int(r3.group(1)), r3.group(2), lower, watch)
    counts = {w: int(c) for w, c in re.findall(r"Transactions in last (\w+): (\d+)", text)}
    return rules, cents(amount.group(1)), to.group(1).strip(), counts


def _format(messages: list[Message]) -> tuple[bool, bool]:
    """(ask_rule, checklist): the answer format the prompt's system message asks for."""
    for (ask_rule, checklist, _), system in SYSTEMS.items():
        if messages[0]["content"] == system:
            return ask_rule, checklist
    return True, False


def asks_rule(messages: list[Message]) -> bool:
    """Whether the prompt asks for the broken rule (``FLAG R<n>``) or the decision alone."""
    return _format(messages)[0]


def _flag(rule: str, messages: list[Message]) -> str:
    return f"FLAG {rule}" if asks_rule(messages) else "FLAG"


def _reply(answer: str, messages: list[Message]) -> str:
    """``answer`` in the format the prompt asks for: after the check lines where it asks for a checklist."""
    return "\n".join([*_checks(messages), answer]) if _format(messages)[1] else answer


def _checks(messages: list[Message]) -> list[str]:
    """The check lines of a checklist answer (one per rule), read from the prompt text as the oracle does."""
    rules, amount, country, counts = _read(messages)
    yn = ["yes" if b else "no" for b in rules.broken(amount, country, counts)]
    money, threshold, lower = _money(amount), *(_money(c, False) for c in (rules.threshold, rules.lower))
    lines = [
        f"R1: {money} over {threshold}? {yn[0]}",
        f"R2: {country} listed? {yn[1]}",
        f"R3: {counts.get(rules.window, 0)} over {rules.limit}? {yn[2]}",
        f"R4: {money} over {lower}, {country} watch-listed? {yn[-1]}",
    ]
    return lines[: len(yn)]


def _violations(messages: list[Message]) -> list[str]:
    rules, amount, country, counts = _read(messages)
    return [r for r, b in zip(rules.ids, rules.broken(amount, country, counts), strict=True) if b]


class PolicyFlaggingEnv(Env):
    """Flag transactions that break a 3- or 4-rule compliance policy; answer ``FLAG R<n>`` or ``CLEAR``.

    Args:
        difficulty: ``"basic"`` (one fixed policy of R1-R3), ``"varied"`` (R1-R3 drawn per task, written in
            the prompt) or ``"combined"`` (``"varied"`` plus R4: amount over a lower threshold AND a
            watch-listed destination, both drawn per task).
        miss_cost: Cost of answering CLEAR on a flagged transaction (default param of ``flag_decision``).
        false_alarm_cost: Cost of flagging a clear transaction (default param of ``flag_decision``).
        balanced_train: Train split like eval (True) or with realistic rare flags (15% flagged, 20% of the
            clear ones near misses, i.i.d.).
        ask_rule: Ask for ``FLAG R<n>`` (True) or the decision alone, ``FLAG``/``CLEAR`` (False: shorter
            answers, no rule tokens for RL to explore; recall per rule is still measured from the decision).
        checklist: Ask for one check line per rule before the answer (``R1: $812.00 over $5,000? no``, ...;
            see :func:`parse_answer`). The decision token then follows the comparisons the model wrote out
            next to it instead of having to make them all inside one token; only the decision is graded.

    """

    name = "policy_flagging"
    description = "Flag bank transactions breaking a compliance policy (amount, sanctions, velocity, ...)."
    default_rewards: ClassVar[dict[str, float]] = {
        "flag_decision": 1.0,
        "flag_rule": 0.5,
        "answer_format": 0.2,
    }

    def __init__(
        self,
        difficulty: str = "basic",
        miss_cost: float = 1.0,
        false_alarm_cost: float = 1.0,
        balanced_train: bool = True,
        ask_rule: bool = True,
        checklist: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        for key, cost in (("miss_cost", miss_cost), ("false_alarm_cost", false_alarm_cost)):
            if not (isinstance(cost, (int, float)) and math.isfinite(cost) and cost >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {cost!r}")
        self.difficulty = difficulty
        self.rules = RULES_COMBINED if difficulty == "combined" else RULES
        self.balanced_train = bool(balanced_train)
        self.ask_rule = bool(ask_rule)
        self.checklist = bool(checklist)
        self.default_reward_params: dict[str, dict[str, Any]] = {
            "flag_decision": {"miss_cost": float(miss_cost), "false_alarm_cost": float(false_alarm_cost)}
        }

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split``; prefix-stable, disjoint across splits by prompt hash."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        seen: set[str] = set()
        return [draw_task(split, seen, self._candidate(split, seed, i), 10_000) for i in range(n)]

    def _candidate(self, split: str, seed: int, i: int) -> Callable[[int], Task]:
        """Draws of task ``i`` (its kind and rule fixed by the stratification), one per attempt."""
        kind, rule = self._kind(split, seed, i)

        def draw(attempt: int) -> Task:
            messages, label_rule = self._sample(random.Random(f"{seed}:{split}:{i}:{attempt}"), kind, rule)
            info = {"rule": label_rule, "near_miss": kind == "near", "difficulty": self.difficulty}
            info["near_miss_rule"] = rule if kind == "near" else None
            reference = {
                "label": "FLAG" if label_rule else "CLEAR",
                "rule": label_rule,
                "ask_rule": self.ask_rule,
                "checklist": self.checklist,
            }
            if len(self.rules) != len(RULES):
                reference["n_rules"] = len(self.rules)  # the check lines a checklist answer must have
            return Task(f"{self.name}/{split}/{seed}/{i}", split, messages, reference, info)

        return draw

    def _kind(self, split: str, seed: int, i: int) -> tuple[str, str | None]:
        """("flag" | "near" | "clear", rule): stratified so every prefix is balanced up to rounding."""
        if split == "train" and not self.balanced_train:
            rng = random.Random(f"{seed}:{split}:{i}:kind")
            if rng.random() < 0.15:
                return "flag", rng.choice(self.rules)
            return ("near", rng.choice(self.rules)) if rng.random() < 0.2 else ("clear", None)
        p, q, k = i // 2, i // 4, len(self.rules)
        if (i % 2 == 0) == (random.Random(f"{seed}:{split}:pair:{p}").random() < 0.5):
            return "flag", random.Random(f"{seed}:{split}:rule:{p // k}").sample(self.rules, k)[p % k]
        if (p % 2 == 0) == (random.Random(f"{seed}:{split}:clear:{q}").random() < 0.5):
            return "near", random.Random(f"{seed}:{split}:near:{q // k}").sample(self.rules, k)[q % k]
        return "clear", None

    def _sample(self, rng: random.Random, kind: str, rule: str | None) -> tuple[list[Message], str | None]:
        data = _data()
        if self.difficulty == "basic":
            b = data["basic_policy"]
            rules = _Rules(b["threshold_dollars"] * 100, tuple(b["countries"]), b["limit"], b["window"])
        else:
            v = data["varied_policy"]
            countries = tuple(rng.sample(sorted(data["sanctionable"]), v["num_countries"]))
            rules = _Rules(
                rng.choice(v["threshold_dollars"]) * 100,
                countries,
                rng.randint(*v["limit"]),
                rng.choice(v["windows"]),
            )
        combined = data["combined_policy"]
        if self.difficulty == "combined":
            lower = round(rules.threshold * rng.choice(combined["lower_fractions"]))
            watch = rng.sample(combined["watch_candidates"], rng.randint(*combined["num_watch"]))
            rules = replace(rules, lower=lower, watch=tuple(watch))
        t, lim = rules.threshold, rules.limit
        amount = round(math.exp(rng.uniform(math.log(500), math.log(t * 0.95))))
        country = rng.choice([c for c in data["allowed"] if c not in rules.watch])  # R4: only on purpose
        count = rng.randint(0, lim - 1)
        if kind == "flag" and rule == "R1":
            amount = t + rng.randint(1, 10_000) if rng.random() < 0.3 else round(t * rng.uniform(1.05, 5))
        elif kind == "near" and rule == "R1":
            amount = t if rng.random() < 0.25 else t - rng.randint(1, 10_000)
        elif rule == "R2":
            listed = rng.choice(rules.countries)
            unlisted = sorted(set(data["sanctionable"]) - set(rules.countries))
            if kind == "flag":
                country = listed
            elif self.difficulty != "basic" and rng.random() < 0.5:
                country = rng.choice(unlisted)
            else:
                country = data["sanctionable"][listed]
        elif rule == "R3":
            over = lim + 1 if rng.random() < 0.3 else rng.randint(lim + 2, 3 * lim)
            count = over if kind == "flag" else lim
        elif rule == "R4":  # flag: over the lower threshold (at most R1's) to a watch-listed country
            low = rules.lower
            over = low + rng.randint(1, 10_000) if rng.random() < 0.3 else round(rng.uniform(low * 1.05, t))
            if kind == "flag" or rng.random() < 0.5:  # near: at or just under the lower threshold
                under = low if rng.random() < 0.25 else low - rng.randint(1, 10_000)
                amount, country = over if kind == "flag" else under, rng.choice(rules.watch)
            else:  # near: over it, to a watch-list candidate this policy does not list
                unlisted = sorted(set(combined["watch_candidates"]) - set(rules.watch))
                amount, country = over, rng.choice(unlisted)
        if self.difficulty == "basic":
            counts = {"24h": count}
        elif rules.window == "1h":
            counts = {"1h": count, "24h": count + rng.randint(0, 3 * lim)}
        else:
            counts = {"1h": rng.randint(0, count), "24h": count}
        user = _render(rules, amount, country, counts, rng)
        system = SYSTEMS[(self.ask_rule, self.checklist, self.rules)]
        return [{"role": "system", "content": system}, {"role": "user", "content": user}], (
            rule if kind == "flag" else None
        )

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        """Verdict: parsed decision and rule, ``correct`` (decision), ``rule_correct`` (decision and rule).

        ``answer`` (the decision, None if unparseable) is the answer class that
        ``algorithm.balance_answers`` balances.
        """
        ans = answer_of(completion, task.reference)
        correct = ans.decision is not None and ans.decision == task.reference["label"]
        return {
            "answer": ans.decision,
            "decision": ans.decision,
            "rule": ans.rule,
            "correct": correct,
            "rule_correct": correct and ans.rule == task.reference["rule"],
            "exact_format": ans.exact,
        }

    def oracle(self, messages: list[Message]) -> str:
        """Read the policy and the transaction from the prompt text and apply the rules."""
        broken = _violations(messages)
        return _reply(_flag(broken[0], messages) if broken else "CLEAR", messages)

    def baselines(self) -> dict[str, Policy]:
        """Constant answers and single-rule heuristics (each reads the prompt text, like the oracle).

        Where the prompt asks for a checklist, each writes the check lines before its answer (they are not
        graded), so that only its decision differs from the oracle's.
        """

        def only(rule: str) -> Policy:
            return lambda m: _reply(_flag(rule, m) if rule in _violations(m) else "CLEAR", m)

        return {
            "constant_clear": lambda m: _reply("CLEAR", m),
            "constant_flag": lambda m: _reply(_flag("R1", m), m),
            **{f"only_{r}": only(r) for r in self.rules},
        }
