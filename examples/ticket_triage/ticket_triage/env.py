"""Ticket triage: route a support ticket to the team the written routing policy names."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import ClassVar

from rltk.env import SPLITS, Env, Message, Outcome, Policy, Task, Teacher, check_choice, draw_task
from ticket_triage.teacher import StaleRouter

TEAMS = {"billing": ("invoice", "charge", "refund"), "technical": ("error", "crash", "login"),
         "shipping": ("parcel", "delivery", "tracking")}  # fmt: skip
POLICY = "; ".join(f"{team}: {', '.join(words)}" for team, words in TEAMS.items())
SYSTEM = f"Route the ticket to one team by the word it mentions ({POLICY}). Answer with the team only."
OPENERS = ("Hello, a question about the", "Please help with the", "Urgent: the", "Hi team, the")


def parse_team(text: str) -> str | None:
    """The team a completion names, or None unless it is exactly one team (check and reward share it)."""
    answer = text.strip().lower()
    return answer if answer in TEAMS else None


class TicketTriageEnv(Env):
    """Route each ticket to the team owning the keyword it mentions; answer ``billing``, ``technical``, ..."""

    name = "ticket_triage"
    description = "Route a support ticket to the team that owns it (billing, technical, shipping)."
    max_new_tokens = 4
    default_rewards: ClassVar[dict[str, float]] = {"ticket_triage_team": 1.0}

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split``: seeded, prefix-stable, disjoint across splits by prompt hash."""
        check_choice("split", split, SPLITS)
        seen: set[str] = set()
        return [draw_task(split, seen, self._draw(split, seed, i)) for i in range(n)]

    def _draw(self, split: str, seed: int, i: int) -> Callable[[int], Task]:
        def draw(attempt: int) -> Task:
            rng = random.Random(f"{seed}:{split}:{i}:{attempt}")  # every draw from (seed, split, i)
            team = rng.choice(sorted(TEAMS))
            word = rng.choice(TEAMS[team])
            number, order = rng.randint(1000, 9999), rng.randint(1, 99)
            ticket = f"Ticket {number}: {rng.choice(OPENERS)} {word}, order {order}."
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ticket}]
            info = {"team": team, "word": word}  # tags: per-slice accuracy in reports
            return Task(f"{self.name}/{split}/{seed}/{i}", split, messages, {"team": team}, info)

        return draw

    def check(self, task: Task, completion: str) -> Outcome:
        """Correct if the answer is the ticket's team; ``answer`` is the parsed team (None: unparseable)."""
        team = parse_team(completion)
        return Outcome(correct=team == task.reference["team"], answer=team)

    def oracle(self, messages: list[Message]) -> str:
        """Apply the policy the system prompt states to the ticket (never the reference)."""
        ticket = messages[-1]["content"]
        return next(team for team, words in TEAMS.items() if any(w in ticket for w in words))

    def baselines(self) -> dict[str, Policy]:
        """One constant answer per team."""
        return {f"always_{team}": (lambda _m, team=team: team) for team in TEAMS}

    def teacher(self) -> Teacher:
        """Last year's router (:class:`~ticket_triage.teacher.StaleRouter`)."""
        return StaleRouter()
