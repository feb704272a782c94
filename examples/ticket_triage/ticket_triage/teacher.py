"""The teacher: last year's keyword router, which predates two of the policy's words."""

from __future__ import annotations

from typing import Any, ClassVar

from rltk.env import Message, Teacher

OLD_TEAMS = {"billing": ("invoice", "charge"), "shipping": ("parcel", "delivery")}


class StaleRouter(Teacher):
    """Routes by last year's keywords: a ticket naming none of them goes to ``technical``.

    It never saw ``refund`` (billing) or ``tracking`` (shipping), so it sends those tickets to technical.
    """

    weak_slices: ClassVar[dict[str, tuple[Any, ...]]] = {"word": ("refund", "tracking")}

    def __call__(self, messages: list[Message]) -> str:
        """The team for the ticket in the last message."""
        ticket = messages[-1]["content"]
        return next((t for t, words in OLD_TEAMS.items() if any(w in ticket for w in words)), "technical")
