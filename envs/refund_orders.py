"""Orders and refund policies of ``support_refund``: the decision, the tools' text, and one episode's tools.

:func:`decide` is the written policy's decision procedure. :func:`render_order` and :func:`render_policy`
write what the ``lookup_order`` and ``get_policy`` tools show; :func:`parse_order` and :func:`parse_policy`
read it back, as the oracle and the baselines do. :class:`RefundEpisode` runs the tools on its own copy of
the task's order database and judges the final answer against the actions taken.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from decimal import Decimal
from typing import Any

from rltk_envs import data, money
from rltk_rewards.refund import parse_resolution

from rltk.env import Step, Task
from rltk.tools import ToolEpisode

_AMOUNT = re.compile(r"\s*(\S+?)[,\s]+\$?(\d[\d,]*(?:\.\d{1,2})?)\s*")


def _data() -> dict[str, Any]:
    return data("support_refund")


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


def parse_order(text: str) -> dict[str, Any]:
    """Read back what :func:`render_order` wrote: purchase date, status, total and items (cents)."""
    head = re.match(r"Order \S+, bought (\S+), status (\w+), total \$([\d,.]+)", text)
    items = [
        [name, cat, _cents(price)] for name, cat, price in re.findall(r"- (.+) \((.+)\) \$([\d,.]+)", text)
    ]
    return {"bought": head.group(1), "status": head.group(2), "total": _cents(head.group(3)), "items": items}


def parse_policy(text: str) -> dict[str, Any]:
    """Read back what :func:`render_policy` wrote for ``all``: the policy as :func:`decide` takes it."""
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
