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
template's tool calling; the tools' schemas travel with the task).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import math
import random
import re
from collections import Counter
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from rltk.env import SPLITS, Env, Episode, Message, Policy, Step, Task, draw_task
from rltk.tools import STOP_STRINGS, ToolCall, ToolEpisode, ToolProtocol, protocol_prompt

DIFFICULTIES = ("easy", "medium", "hard")
REASONS = ("already_refunded", "outside_window", "non_refundable")
_RESOLUTION = re.compile(r"(refund|escalate|deny\s*:\s*(" + "|".join(REASONS) + "))", re.IGNORECASE)
_AMOUNT = re.compile(r"\s*(\S+?)[,\s]+\$?(\d[\d,]*(?:\.\d{1,2})?)\s*")


@cache
def _data() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "data" / "support_refund.json").read_text())


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


def money(cents: int) -> str:
    """``$1,049.99``."""
    return f"${cents // 100:,}.{cents % 100:02d}"


def decide(order: dict[str, Any], policy: dict[str, Any], today: str) -> tuple[str, int]:
    """The policy's resolution of an order and the amount to refund (cents; 0 unless ``refund``)."""
    if order["status"] == "refunded":
        return "deny: already_refunded", 0
    days = (dt.date.fromisoformat(today) - dt.date.fromisoformat(order["bought"])).days
    if policy["window"] is not None and days > policy["window"]:
        return "deny: outside_window", 0
    amount = sum(cents for _, category, cents in order["items"] if category not in policy["non_refundable"])
    if amount == 0:
        return "deny: non_refundable", 0
    if policy["limit"] is not None and amount > policy["limit"]:
        return "escalate", 0
    return "refund", amount


def render_order(order_id: str, order: dict[str, Any]) -> str:
    """What ``lookup_order`` shows."""
    total = sum(c for *_, c in order["items"])
    head = f"Order {order_id}, bought {order['bought']}, status {order['status']}, total {money(total)}"
    return "\n".join([head, *(f"- {name} ({cat}) {money(c)}" for name, cat, c in order["items"])])


def render_policy(policy: dict[str, Any], category: str = "all") -> str:
    """What ``get_policy`` shows: the whole policy, or the rule for one category."""
    window = f"within {policy['window']} days of purchase" if policy["window"] is not None else "at any time"
    limit = f"Refunds over {money(policy['limit'])} need escalation." if policy["limit"] is not None else ""
    if category == "all":
        nonref = policy["non_refundable"]
        cats = f"Non-refundable: {', '.join(nonref)}." if nonref else "All categories are refundable."
        return " ".join(s for s in (f"Refunds {window}.", cats, limit) if s)
    if category in policy["non_refundable"]:
        return f"{category}: non-refundable."
    return " ".join(s for s in (f"{category}: refundable {window}.", limit) if s)


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


def _parse_order(text: str) -> dict[str, Any]:
    head = re.match(r"Order \S+, bought (\S+), status (\w+), total \$([\d,.]+)", text)
    items = [
        [name, cat, _cents(price)] for name, cat, price in re.findall(r"- (.+) \((.+)\) \$([\d,.]+)", text)
    ]
    return {"bought": head.group(1), "status": head.group(2), "total": _cents(head.group(3)), "items": items}


def _parse_policy(text: str) -> dict[str, Any]:
    window = re.search(r"within (\d+) days", text)
    nonref = re.search(r"Non-refundable: ([^.]+)\.", text)
    limit = re.search(r"over \$([\d,.]+) need escalation", text)
    return {
        "window": int(window.group(1)) if window else None,
        "non_refundable": nonref.group(1).split(", ") if nonref else [],
        "limit": _cents(limit.group(1)) if limit else None,
    }


def _cents(text: str) -> int:
    value = Decimal(text.replace(",", ""))
    if value != value.quantize(Decimal("0.01")) or value <= 0:
        raise ValueError(f"bad amount {text!r}: write dollars like 19.99")
    return int(value * 100)


def _item(rng: random.Random, non_refundable: list[str], p_non_refundable: float) -> list[Any]:
    """``[name, category, cents]``: in a non-refundable category with probability ``p_non_refundable``."""
    d = _data()
    pool = non_refundable if non_refundable and rng.random() < p_non_refundable else None
    cat = rng.choice(pool or [c for c in sorted(d["categories"]) if c not in non_refundable])
    dollars = round(math.exp(rng.uniform(*map(math.log, d["price_dollars"]))))
    return [rng.choice(d["categories"][cat]), cat, dollars * 100 + rng.choice(d["price_cents"])]


class RefundEpisode(ToolEpisode):
    """One rollout: tools bound to this episode's own copy of the order database."""

    def __init__(self, task: Task) -> None:
        ref = task.reference
        self.orders: dict[str, dict[str, Any]] = copy.deepcopy(ref["orders"])
        self.refunds: list[tuple[str, int]] = []
        self.escalations: list[str] = []
        self.replies: list[str] = []
        self.expected = copy.deepcopy(ref["orders"])
        if ref["amount"]:
            self._apply(self.expected[ref["order_id"]], ref["amount"])
        tools = {
            "lookup_order": lambda order_id: render_order(*self._order(order_id)),
            "get_policy": self._get_policy,
            "issue_refund": self._issue_refund,
            "escalate": self._escalate,
            "reply": self._reply,
        }
        super().__init__(task, tools, self._judge)

    def _order(self, order_id: str) -> tuple[str, dict[str, Any]]:
        key = order_id.strip().upper()
        if key not in self.orders:
            raise LookupError(f"no order {order_id.strip()!r}")
        return key, self.orders[key]

    def _get_policy(self, category: str) -> str:
        category = category.strip().lower() or "all"
        if category != "all" and category not in _data()["categories"]:
            raise LookupError(f"unknown category {category!r}: ask for a category of the order, or all")
        return render_policy(self.task.reference["policy"], category)

    @staticmethod
    def _apply(order: dict[str, Any], cents: int) -> None:
        order["refunded"] += cents
        total = sum(c for *_, c in order["items"])
        order["status"] = "refunded" if order["refunded"] >= total else "partially refunded"

    def _issue_refund(self, argument: str) -> str:
        m = _AMOUNT.fullmatch(argument)
        if not m:
            raise ValueError("write the order id and the amount, e.g. A-1234 19.99")
        key, order = self._order(m.group(1))
        cents = _cents(m.group(2))
        left = sum(c for *_, c in order["items"]) - order["refunded"]
        if cents > left:
            raise ValueError(f"{money(cents)} is more than the {money(left)} left to refund on {key}")
        self._apply(order, cents)
        self.refunds.append((key, cents))
        return f"refunded {money(cents)} on order {key}"

    def _escalate(self, reason: str) -> str:
        if not reason.strip():
            raise ValueError("give a reason")
        self.escalations.append(reason.strip())
        return "escalated to a manager"

    def _reply(self, text: str) -> str:
        self.replies.append(text)
        return "sent"

    def unfinished_outcome(self) -> dict[str, Any]:
        """No valid resolution (yet): never correct; ``harmful`` says whether money already moved wrongly."""
        return {"correct": False, "answered": False, "valid": False, "answer": None, **self._state()}

    def _state(self) -> dict[str, Any]:
        db_matches = self.orders == self.expected
        return {
            "db_matches": db_matches,
            "harmful": bool(self.refunds) and not db_matches,
            "refunded": sum(c for _, c in self.refunds),
            "escalated": bool(self.escalations),
        }

    def _judge(self, text: str) -> dict[str, Any]:
        label = parse_resolution(text)
        acted = {"refund": bool(self.refunds), "escalate": bool(self.escalations)}
        kind = label.split(":")[0] if label else None
        valid = kind is not None and all(acted[k] == (k == kind) for k in acted)
        state = self._state()
        correct = valid and label == self.task.reference["resolution"] and state["db_matches"]
        return {"correct": correct, "valid": valid, "answer": label, **state}

    def step(self, action: str) -> Step:
        """Run one turn (:class:`ToolEpisode`); while unanswered, ``outcome`` follows the state."""
        step = super().step(action)
        if not step.done:
            self.outcome = self.unfinished_outcome()
        return step


class SupportRefundEnv(Env):
    """Resolve a refund request with tools: look up the order, read the policy, refund, deny or escalate.

    Args:
        difficulty: ``"easy"``, ``"medium"`` or ``"hard"`` (module docstring).
        tool_calling: ``"text"`` (the plain-text tool protocol) or ``"native"`` (the chat template's).

    """

    name = "support_refund"
    description = (
        "Resolve customer refund requests with order/policy tools: refund, deny with a reason, escalate."
    )
    max_turns = 5
    stop_strings = STOP_STRINGS
    default_rewards: ClassVar[dict[str, float]] = {"correct": 1.0, "refund_harm": 0.5}

    def __init__(self, difficulty: str = "easy", tool_calling: str = "text", **options: Any) -> None:
        super().__init__(**options)
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        self.difficulty = difficulty
        self.protocol = ToolProtocol(_data()["tools"], tool_calling)
        self.stop_strings = self.protocol.stop_strings

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split``; prefix-stable, stratified by kind, splits disjoint by prompt hash."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
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
        order = _parse_order(results["lookup_order"])
        label, cents = decide(order, _parse_policy(results["get_policy"]), facts["today"])
        if label == "refund" and "issue_refund" not in results:
            return call("issue_refund", f"{oid} {cents // 100}.{cents % 100:02d}")
        if label == "escalate" and "escalate" not in results:
            return call("escalate", "refund over the limit")
        return f"<answer>{label}</answer>"

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
            total = _parse_order(facts["results"]["lookup_order"])["total"]
            return protocol.call("issue_refund", f"{oid} {total // 100}.{total % 100:02d}")
        if label == "escalate" and turn == 0:
            return protocol.call("escalate", "customer wants a refund")
        return f"<answer>{label}</answer>"

    return act
