"""The teacher of ``support_refund``: the refund macro a support desk runs today, blind to categories."""

from __future__ import annotations

from typing import Any, ClassVar

from rltk_envs.refund_orders import decide, parse_order, parse_policy

from rltk.env import Message, Teacher
from rltk.tools import ToolCall, ToolProtocol


class RefundTeacher(Teacher):
    """The scripted refund macro of a support desk: look up, read the policy, then refund the order's total.

    Workflow it stands for: the desk's macro calls ``lookup_order`` and ``get_policy`` (all), denies an order
    already refunded or bought outside the refund window, escalates when the amount is over the escalation
    limit, and otherwise refunds, then answers in the env's format. Its one gap is a policy clause it was
    never updated for: it never checks the non-refundable categories, so the amount it acts on is always the
    order's whole total. Like the oracle, it reads only the conversation.

    How it fails, and on which cue: whenever ``get_policy`` lists a category of one of the order's items as
    ``Non-refundable``, it still refunds (or escalates) the full total. Slices (``Task.info["kind"]``):
    ``category_deny`` (easy) and ``non_refundable`` (medium, hard) get a refund (or an escalation) instead of
    ``deny: non_refundable``; ``partial_refund`` (hard) gets the whole total refunded (or escalated) instead
    of the refundable items. Every other kind it resolves as the oracle does. A turn it cannot read (a
    conversation without a request) is answered by escalating, so it never raises; every episode it plays on
    a task ends in a valid resolution.

    Measured accuracy (``correct``; seed 0, 200 tasks; the recipe's options ``{difficulty: easy}`` are the
    env's defaults, so one row covers both):

    ================  ===============  ===============  ============  =======
    options           teacher (eval)   teacher (test)   best trivial  oracle
    ================  ===============  ===============  ============  =======
    easy (default)    0.750            0.750            0.500         1.000
    medium            0.670            0.670            0.335         1.000
    hard              0.665            0.665            0.170         1.000
    ================  ===============  ===============  ============  =======

    All of its errors (100%) fall in the named slices. Kinds are stratified in blocks, so its easy accuracy
    is 0.75 on every seed and split: one kind in four is ``category_deny``.
    """

    weak_slices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "kind": ("category_deny", "non_refundable", "partial_refund")
    }

    def __init__(self, protocol: ToolProtocol) -> None:
        self.protocol = protocol

    def __call__(self, messages: list[Message]) -> str:
        """The macro's next turn: a tool call, or the final ``<answer>``."""
        from rltk_envs.support_refund import _read  # the oracle's reader (imported late: no import cycle)

        try:
            facts = _read(messages, self.protocol)
            return self._next(facts["order_id"], facts["results"], facts["today"])
        except Exception:  # an unreadable conversation: hand it to a human, never raise
            return self._escalate(messages)

    def _next(self, order_id: str, results: dict[str, str], today: str) -> str:
        call = self.protocol.call
        if "lookup_order" not in results:
            return call("lookup_order", order_id)
        if "get_policy" not in results:
            return call("get_policy", "all")
        order = parse_order(results["lookup_order"])
        policy = parse_policy(results["get_policy"])
        label, cents = _decide_ignoring_categories(order, policy, today)
        if label == "refund" and "issue_refund" not in results:
            return call("issue_refund", f"{order_id} {cents // 100}.{cents % 100:02d}")
        if label == "escalate" and "escalate" not in results:
            return call("escalate", "refund over the limit")
        return f"<answer>{label}</answer>"

    def _escalate(self, messages: list[Message]) -> str:
        turns = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        parsed = [self.protocol.parse(t) for t in turns if isinstance(t, str)]
        if any(isinstance(p, ToolCall) and p.name == "escalate" for p in parsed):
            return "<answer>escalate</answer>"
        return self.protocol.call("escalate", "cannot read the request")


def _decide_ignoring_categories(order: dict[str, Any], policy: dict[str, Any], today: str) -> tuple[str, int]:
    """The env's decision procedure with the non-refundable clause dropped: the amount is the order total."""
    return decide(order, {**policy, "non_refundable": []}, today)
