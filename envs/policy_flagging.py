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
:func:`rltk_rewards.flagging.parse_answer` is the one answer parser, shared by :meth:`PolicyFlaggingEnv.check`
and the rewards; :mod:`rltk_envs.flagging_prompt` writes the prompt and reads it back for the oracle.

Teacher (:mod:`rltk_envs.flagging_teacher`): a rule engine still configured with last year's policy, an R1
threshold 10% under the written one and an R2 list without the two countries the policy lists last. It
errs on clear transactions within 10% under the threshold (``info["amount_band"] == "within_10pct_under"``,
the R1 near misses: false alarms) and on transfers to those two countries (``info["listed_position"]`` 4
or 5: missed flags), and on nothing else. Accuracy at the default options (the recipes'), 200 tasks, seed
0: eval 0.855, test 0.845 (oracle 1.000, best trivial 0.670).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar

from rltk_envs import data
from rltk_envs.flagging_prompt import RULES, RULES_COMBINED, SYSTEMS, Rules, flag, render, reply, violations
from rltk_envs.flagging_teacher import StalePolicyTeacher
from rltk_rewards.flagging import answer_of, parse_answer

from rltk.env import SPLITS, Env, FinalAnswer, Message, Policy, Task, Teacher, check_choice, draw_task

DIFFICULTIES = ("basic", "varied", "combined")


def _data() -> dict[str, Any]:
    return data("policy_flagging")


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
            see :func:`~rltk_rewards.flagging.parse_answer`). The decision token then follows the comparisons
            the model wrote out next to it instead of having to make them all inside one token; only the
            decision is graded.

    """

    name = "policy_flagging"
    description = "Flag bank transactions breaking a compliance policy (amount, sanctions, velocity, ...)."
    max_new_tokens = 6  # "FLAG R2" / "CLEAR"
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
        check_choice("difficulty", difficulty, DIFFICULTIES)
        for key, cost in (("miss_cost", miss_cost), ("false_alarm_cost", false_alarm_cost)):
            if not (isinstance(cost, (int, float)) and math.isfinite(cost) and cost >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {cost!r}")
        self.difficulty = difficulty
        self.miss_cost, self.false_alarm_cost = float(miss_cost), float(false_alarm_cost)
        self.rules = RULES_COMBINED if difficulty == "combined" else RULES
        self.balanced_train = bool(balanced_train)
        self.ask_rule = bool(ask_rule)
        self.checklist = bool(checklist)
        if self.checklist:
            self.max_new_tokens = 64  # three check lines, then the decision: up to 48 tokens
        self.default_reward_params: dict[str, dict[str, Any]] = {
            "flag_decision": {"miss_cost": float(miss_cost), "false_alarm_cost": float(false_alarm_cost)}
        }

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split``; prefix-stable, disjoint across splits by prompt hash."""
        check_choice("split", split, SPLITS)
        seen: set[str] = set()
        return [draw_task(split, seen, self._candidate(split, seed, i), 10_000) for i in range(n)]

    def _candidate(self, split: str, seed: int, i: int) -> Callable[[int], Task]:
        """Draws of task ``i`` (its kind and rule fixed by the stratification), one per attempt."""
        kind, rule = self._kind(split, seed, i)

        def draw(attempt: int) -> Task:
            rng = random.Random(f"{seed}:{split}:{i}:{attempt}")
            messages, label_rule, tags = self._sample(rng, kind, rule)
            info = {"rule": label_rule, "near_miss": kind == "near", "difficulty": self.difficulty}
            info["near_miss_rule"] = rule if kind == "near" else None
            info.update(tags)
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

    def _sample(
        self, rng: random.Random, kind: str, rule: str | None
    ) -> tuple[list[Message], str | None, dict[str, Any]]:
        """(messages, the rule broken or None, tags of the transaction for ``Task.info``).

        Tags: ``amount_band`` (``"over"`` R1's threshold, ``"within_10pct_under"`` it, ``"further_under"``)
        and ``listed_position`` (the destination's 1-based place in R2's list, 0 if unlisted): the teacher's
        weak slices are read from them.
        """
        data = _data()
        if self.difficulty == "basic":
            b = data["basic_policy"]
            rules = Rules(b["threshold_dollars"] * 100, tuple(b["countries"]), b["limit"], b["window"])
        else:
            v = data["varied_policy"]
            countries = tuple(rng.sample(sorted(data["sanctionable"]), v["num_countries"]))
            rules = Rules(
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
        user = render(rules, amount, country, counts, data["merchants"], rng)
        system = SYSTEMS[(self.ask_rule, self.checklist, self.rules)]
        band = "over" if amount > t else "within_10pct_under" if 10 * amount > 9 * t else "further_under"
        listed = rules.countries.index(country) + 1 if country in rules.countries else 0
        tags = {"amount_band": band, "listed_position": listed}
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return messages, (rule if kind == "flag" else None), tags

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        """Verdict: parsed decision and rule, ``correct`` (decision), ``rule_correct`` (decision and rule).

        ``cost`` is the decision's cost under the env's cost matrix (``miss_cost`` for a flag missed,
        ``false_alarm_cost`` for a clear transaction flagged, 0 when right; an unparseable answer raises no
        flag), which reports give per 1,000 decisions.

        ``answer`` (the decision, None if unparseable) is the answer class that
        ``algorithm.balance_answers`` balances.
        """
        ans = answer_of(completion, task.reference)
        label = task.reference["label"]
        correct = ans.decision is not None and ans.decision == label
        flagged = ans.decision == "FLAG"  # an answer that does not parse raises no flag
        cost = self.miss_cost if label == "FLAG" and not flagged else 0.0
        return {
            "cost": cost + (self.false_alarm_cost if label == "CLEAR" and flagged else 0.0),
            "answer": ans.decision,
            "decision": ans.decision,
            "rule": ans.rule,
            "correct": correct,
            "rule_correct": correct and ans.rule == task.reference["rule"],
            "exact_format": ans.exact,
        }

    def oracle(self, messages: list[Message]) -> str:
        """Read the policy and the transaction from the prompt text and apply the rules."""
        broken = violations(messages)
        return reply(flag(broken[0], messages) if broken else "CLEAR", messages)

    def teacher(self) -> Teacher:
        """A rule engine with last year's policy (:class:`~rltk_envs.flagging_teacher.StalePolicyTeacher`)."""
        return StalePolicyTeacher()

    def final_answer(self, messages: list[Message], actions: list[str]) -> FinalAnswer:
        """The vote key, parsed in the format the prompt's system message asks for (never the reference).

        ``"FLAG R<n>"`` (``"FLAG"`` where the rule is not asked for, or not named), or ``"CLEAR"``; None
        when the last turn does not parse.
        """
        if not actions:
            return None
        system = messages[0].get("content") if messages and isinstance(messages[0], dict) else None
        asked = next((key for key, text in SYSTEMS.items() if text == system), None)
        ask_rule, checklist, rules = asked or (self.ask_rule, self.checklist, self.rules)
        ans = parse_answer(actions[-1], ask_rule, checklist, len(rules))
        if ans.decision == "FLAG" and ask_rule and ans.rule is not None:
            return f"FLAG {ans.rule}"
        return ans.decision

    def baselines(self) -> dict[str, Policy]:
        """Constant answers and single-rule heuristics (each reads the prompt text, like the oracle).

        Where the prompt asks for a checklist, each writes the check lines before its answer (they are not
        graded), so that only its decision differs from the oracle's.
        """

        def only(rule: str) -> Policy:
            return lambda m: reply(flag(rule, m) if rule in violations(m) else "CLEAR", m)

        return {
            "constant_clear": lambda m: reply("CLEAR", m),
            "constant_flag": lambda m: reply(flag("R1", m), m),
            **{f"only_{r}": only(r) for r in self.rules},
        }
