"""Customer-support refunds: a multi-turn tool workflow on a per-episode order database.

Workflow: a customer asks for a refund on one order. The agent sees only the message and today's date; the
order (items, categories, prices, purchase date, status) and the refund policy are behind tools, so it must
call ``lookup_order`` and ``get_policy`` before it can decide. Policies are drawn per task: a refund window in
days, non-refundable categories and (hard) an amount over which a refund must be escalated. The decision
procedure, written out in the system prompt, is: status refunded → ``deny: already_refunded``; bought more
days ago than the window → ``deny: outside_window``; refund amount = the items in refundable categories, 0 →
``deny: non_refundable``; amount over the limit → ``escalate``; else refund that amount.

Resolution: the final ``<answer>`` names it (``refund`` | ``escalate`` | ``deny: <reason>``) and it must agree
with the actions taken: ``refund`` only after at least one successful ``issue_refund`` and no ``escalate``,
``escalate`` only after ``escalate`` and no refund, ``deny`` only when neither was called. An answer that
disagrees with the actions, does not parse, or never comes (a turn limit) is no valid resolution, so doing
nothing never counts as a deny. ``reply`` only messages the customer and changes nothing graded.

Rewarded: ``correct`` (:mod:`rltk_rewards.outcome`; 1 if the resolution is the oracle's and the final order
database equals the oracle's: the right amount on the right order, nothing else changed) and ``refund_harm``
(:mod:`rltk_rewards.refund`; -1 for money moved wrongly: a refund outside policy or of a wrong amount, or for
an episode without a valid resolution; else 0). Difficulty: ``easy`` (one policy rule, one item), ``medium``
(window and non-refundable categories, one item), ``hard`` (2-3 items: partial refunds, escalation limit,
already refunded orders). Resolution kinds are stratified in blocks, so every prefix of the tasks is
balanced. Option ``tool_calling``: ``"text"`` (the :mod:`rltk.tools` text protocol) or ``"native"`` (the chat
template's tool calling; the tools' schemas travel with the task). The decision procedure, the tools and the
episode's order database are in :mod:`rltk_envs.refund_orders`; the answer parser is
:func:`rltk_rewards.refund.parse_resolution`.

Teacher (:class:`rltk_envs.refund_teacher.RefundTeacher`): the desk's refund macro, which looks up the order
and the policy but never checks the non-refundable categories, so it refunds (or escalates) the order's whole
total. It gets the ``kind`` slices ``category_deny``, ``non_refundable`` and ``partial_refund`` wrong (all of
its errors) and everything else right: accuracy 0.75 at easy (the recipe's and the default options; best
trivial 0.50, oracle 1.00), 0.67 at medium (trivial 0.335), 0.665 at hard (trivial 0.17), on 200 eval
tasks and on 200 test tasks alike (seed 0).
"""

from __future__ import annotations

import datetime as dt
import math
import random
import re
from collections import Counter
from functools import cache
from typing import Any, ClassVar

from rltk_envs import data
from rltk_envs.refund_orders import _AMOUNT, RefundEpisode, _cents, decide, parse_order, parse_policy
from rltk_rewards.refund import parse_resolution

from rltk.env import SPLITS, Episode, FinalAnswer, Message, Policy, Task, Teacher, check_choice, draw_task
from rltk.tools import FinalAnswer as AnswerTurn
from rltk.tools import ToolCall, ToolEnv, ToolProtocol, protocol_prompt

DIFFICULTIES = ("easy", "medium", "hard")


def _data() -> dict[str, Any]:
    return data("support_refund")


@cache
def system_prompt(tool_calling: str = "text") -> str:
    """The system prompt, the same for every task: tools (:mod:`rltk.tools` protocol), decisions, answers.

    Natively the chat template lists the tools, so the prompt does not.
    """
    d = _data()
    protocol = (
        "\n".join(d["text_protocol"]) if tool_calling == "text" else protocol_prompt(d["tools"], tool_calling)
    )
    return "\n".join(d["system"]).replace("{protocol}", protocol)


def _read(messages: list[Message], protocol: ToolProtocol) -> dict[str, Any]:
    """What the conversation says: today, the order id, and each successful tool's result by tool name."""
    user = messages[1]["content"]
    facts: dict[str, Any] = {
        "today": re.search(r"Today is (\d{4}-\d\d-\d\d)", user).group(1),
        "order_id": re.search(r"order ([A-Z]-\d{4})", user, re.IGNORECASE).group(1).upper(),
        "results": {},
    }
    for turn, obs in zip(messages[2::2], messages[3::2], strict=False):
        call, result = protocol.parse(turn["content"]), protocol.result(obs["content"])
        if isinstance(call, ToolCall) and result is not None:
            facts["results"][call.name] = result
    return facts


def _item(rng: random.Random, non_refundable: list[str], p_non_refundable: float) -> list[Any]:
    """``[name, category, cents]``: in a non-refundable category with probability ``p_non_refundable``."""
    d = _data()
    pool = non_refundable if non_refundable and rng.random() < p_non_refundable else None
    cat = rng.choice(pool or [c for c in sorted(d["categories"]) if c not in non_refundable])
    dollars = round(math.exp(rng.uniform(*map(math.log, d["price_dollars"]))))
    return [rng.choice(d["categories"][cat]), cat, dollars * 100 + rng.choice(d["price_cents"])]


class SupportRefundEnv(ToolEnv):
    """Resolve a refund request with tools: look up the order, read the policy, refund, deny or escalate.

    Args:
        difficulty: ``"easy"``, ``"medium"`` or ``"hard"`` (module docstring).
        tool_calling: ``"text"`` (the plain-text tool protocol) or ``"native"`` (the chat template's).

    """

    name = "support_refund"
    description = (
        "Resolve customer refund requests with order/policy tools: refund, deny with a reason, escalate."
    )
    max_new_tokens = 32  # the longest oracle call (issue_refund with id and amount) is ~24 tokens
    max_turns = 5
    default_rewards: ClassVar[dict[str, float]] = {"correct": 1.0, "refund_harm": 0.5}

    def __init__(self, difficulty: str = "easy", tool_calling: str = "text", **options: Any) -> None:
        super().__init__(_data()["tools"], tool_calling, **options)
        check_choice("difficulty", difficulty, DIFFICULTIES)
        self.difficulty = difficulty

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split``; prefix-stable, stratified by kind, splits disjoint by prompt hash."""
        check_choice("split", split, SPLITS)
        kinds = list(_data()["kinds"][self.difficulty])
        out: list[Task] = []
        seen: set[str] = set()
        for i in range(n):
            block = random.Random(f"{seed}:{split}:block:{i // len(kinds)}").sample(kinds, len(kinds))

            def draw(attempt: int, i: int = i, kind: str = block[i % len(kinds)]) -> Task | None:
                case = self._sample(random.Random(f"{seed}:{split}:{i}:{attempt}"), kind)
                task_id = f"{self.name}/{split}/{seed}/{i}"
                return None if case is None else Task(task_id, split, *case, tools=self.protocol.schemas)

            out.append(draw_task(split, seen, draw))
        return out

    def _sample(self, rng: random.Random, kind: str) -> tuple[list[Message], dict, dict] | None:
        """One candidate task of ``kind``, or None where the draw decides another kind (rejected)."""
        d, hard = _data(), self.difficulty == "hard"
        window = rng.choice(d["windows_days"])
        nonref = sorted(rng.sample(sorted(d["categories"]), rng.choice(d["num_non_refundable"])))
        limit = rng.choice(d["limits_dollars"]) * 100 if hard else None
        if kind.startswith("window"):
            nonref = []
        elif kind.startswith("category"):
            window = None
        p_nonref = d["non_refundable_item_share"].get(kind, 0.0)
        items = [_item(rng, nonref, p_nonref) for _ in range(rng.choice([2, 3]) if hard else 1)]
        if window is None:
            days = rng.randint(1, 400)
        elif kind in ("window_deny", "outside_window"):
            days = window + 1 if rng.random() < 0.25 else rng.randint(window + 2, 3 * window)
        else:
            days = window if rng.random() < 0.25 else rng.randint(0, window - 1)
        lo, hi = (dt.date.fromisoformat(s) for s in d["date_range"])
        today = lo + dt.timedelta(days=rng.randint(0, (hi - lo).days))
        total, refunded = sum(c for *_, c in items), kind == "already_refunded"
        order = {
            "items": items,
            "bought": (today - dt.timedelta(days=days)).isoformat(),
            "status": "refunded" if refunded else "delivered",
            "refunded": total if refunded else 0,
        }
        policy = {"window": window, "non_refundable": nonref, "limit": limit}
        resolution, amount = decide(order, policy, today.isoformat())
        full = hard and amount == total
        if resolution != d["kinds"][self.difficulty][kind] or (kind == "full_refund") != full:
            return None
        ids = [f"{rng.choice(d['order_letters'])}-{k}" for k in rng.sample(range(1000, 10_000), 3)]
        orders = {ids[0]: order}
        for oid in ids[1:]:  # other customers' orders: refunding one is a harm
            bought = (today - dt.timedelta(days=rng.randint(0, 200))).isoformat()
            orders[oid] = {
                "items": [_item(rng, [], 0.0)],
                "bought": bought,
                "status": "delivered",
                "refunded": 0,
            }
        message = rng.choice(d["customer_messages"]).format(order_id=ids[0], reason=rng.choice(d["reasons"]))
        user = d["user"].format(today=today.isoformat(), message=message)
        system = system_prompt(self.protocol.tool_calling)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        near = (window is not None and days in (window, window + 1)) or (hard and amount and total > limit)
        reference = {"order_id": ids[0], "resolution": resolution, "amount": amount, "orders": orders}
        reference |= {"policy": policy, "today": today.isoformat()}
        info = {
            "difficulty": self.difficulty,
            "kind": kind,
            "resolution": resolution,
            "near_miss": bool(near),
        }
        return messages, reference, info

    def episode(self, task: Task) -> Episode:
        """A fresh :class:`RefundEpisode` (its own copy of the order database)."""
        return RefundEpisode(task)

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        """The verdict of ``completion`` as the episode's only turn (no tool called before it)."""
        episode = self.episode(task)
        episode.step(completion)
        return episode.outcome

    def oracle(self, messages: list[Message]) -> str:
        """Look up the order, read the whole policy, act on the decision, then answer (observations only)."""
        call, facts = self.protocol.call, _read(messages, self.protocol)
        oid, results = facts["order_id"], facts["results"]
        if "lookup_order" not in results:
            return call("lookup_order", oid)
        if "get_policy" not in results:
            return call("get_policy", "all")
        order = parse_order(results["lookup_order"])
        label, cents = decide(order, parse_policy(results["get_policy"]), facts["today"])
        if label == "refund" and "issue_refund" not in results:
            return call("issue_refund", f"{oid} {cents // 100}.{cents % 100:02d}")
        if label == "escalate" and "escalate" not in results:
            return call("escalate", "refund over the limit")
        return f"<answer>{label}</answer>"

    def teacher(self) -> Teacher:
        """The desk's refund macro, blind to non-refundable categories (:mod:`rltk_envs.refund_teacher`)."""
        from rltk_envs.refund_teacher import RefundTeacher  # it reads conversations with this module's reader

        return RefundTeacher(self.protocol)

    def final_answer(self, messages: list[Message], actions: list[str]) -> FinalAnswer:
        """The episode's resolution and the refund it issued, from the actions alone (never the reference).

        ``("refund", dollars)`` (the sum of the refunds issued on the requested order), ``("escalate", None)``
        or ``("deny", reason)``; None when the last turn is no parseable ``<answer>``, when the answer
        disagrees with the calls made (as the env judges validity: a refund only with a refund call and no
        escalation, and so on), or when a refund went to another order. The calls' results are not seen: a
        refund written so that the tool cannot read it is left out, one it refused for its amount still counts
        (the key only picks a best-of-N episode).
        """
        parsed = [self.protocol.parse(a) for a in actions]
        label = parse_resolution(parsed[-1].text) if parsed and isinstance(parsed[-1], AnswerTurn) else None
        if label is None:
            return None
        calls = [p for p in parsed[:-1] if isinstance(p, ToolCall)]
        refunds = [r for c in calls if c.name == "issue_refund" and (r := _refund(c.argument)) is not None]
        found = re.search(r"order ([A-Z]-\d{4})", messages[1]["content"] if len(messages) > 1 else "", re.I)
        if any(found is None or oid != found.group(1).upper() for oid, _ in refunds):
            return None  # money moved on another order
        escalated = any(c.name == "escalate" and c.argument.strip() for c in calls)
        kind = label.split(":")[0]
        if (kind == "refund") != bool(refunds) or (kind == "escalate") != escalated:
            return None
        if kind == "refund":
            return ("refund", sum(cents for _, cents in refunds) / 100)
        return ("escalate", None) if kind == "escalate" else ("deny", label.removeprefix("deny: "))

    def baselines(self) -> dict[str, Policy]:
        """Constant resolutions (each acts as its answer requires, so that it is a valid resolution) and echo.

        ``always_deny`` uses the most common deny reason and ``most_frequent`` the most common resolution of
        this difficulty's task mix (a refund is of the order's full total).
        """
        counts = Counter(_data()["kinds"][self.difficulty].values())
        denies = [r for r, _ in counts.most_common() if r.startswith("deny")]
        top = counts.most_common(1)[0][0]
        return {
            "always_deny": _constant(denies[0], self.protocol),
            "always_refund_full": _constant("refund", self.protocol),
            "always_escalate": _constant("escalate", self.protocol),
            "most_frequent": _constant(top, self.protocol),
            "echo": lambda m: m[-1]["content"],
        }


def _refund(argument: str) -> tuple[str, int] | None:
    """The ``(order id, cents)`` of an ``issue_refund`` argument, None where the tool refuses its text."""
    m = _AMOUNT.fullmatch(argument)
    try:
        return (m.group(1).strip().upper(), _cents(m.group(2))) if m else None
    except (ValueError, ArithmeticError):
        return None


def _constant(label: str, protocol: ToolProtocol) -> Policy:
    """A scripted policy that resolves every case as ``label``, with the actions that answer needs.

    ``refund``: look the order up, refund its full total, answer; ``escalate``: escalate, answer; a deny:
    answer at once. Calls are written as ``protocol`` writes them.
    """

    def act(messages: list[Message]) -> str:
        turn, facts = (len(messages) - 2) // 2, _read(messages, protocol)
        oid = facts["order_id"]
        if label == "refund" and turn == 0:
            return protocol.call("lookup_order", oid)
        if label == "refund" and turn == 1 and "lookup_order" in facts["results"]:
            total = parse_order(facts["results"]["lookup_order"])["total"]
            return protocol.call("issue_refund", f"{oid} {total // 100}.{total % 100:02d}")
        if label == "escalate" and turn == 0:
            return protocol.call("escalate", "customer wants a refund")
        return f"<answer>{label}</answer>"

    return act
