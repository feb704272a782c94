"""``rltk envs new NAME``: write an env plugin package that ``pip install -e`` installs, found at once.

The package is a complete, working env, ticket triage (route a support ticket to the team the prompt's
policy names), renamed to ``NAME``, to edit into your own::

    NAME/pyproject.toml          entry points: the env in ``rltk.envs``, its reward in ``rltk.rewards``
    NAME/NAME/env.py             the env: tasks, check (-> Outcome), oracle, baselines
    NAME/NAME/teacher.py         the teacher: the imperfect workflow the model replaces (its own module)
    NAME/NAME/rewards.py         the reward: fn(completion, reference, outcome) -> float
    NAME/recipes/NAME_grpo.yaml  a GRPO recipe on the ``tiny`` model (seconds a step on a CPU)
    NAME/tests/test_NAME.py      runs ``rltk envs check NAME`` (the whole env contract)

``examples/ticket_triage`` in the rltk repository is this package for the name ``ticket_triage``
(``tests/test_env_contract.py`` checks that it matches, so the example and the scaffold cannot drift). A
new package's summary (pyproject description, package docstring) is a placeholder naming it, to describe
its own workflow in.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
from pathlib import Path

from rltk.plugins import PluginError, list_envs, list_rewards

EXAMPLE = "ticket_triage"
"""The name the templates are written for; ``write_package`` puts the new one (and its CamelCase) there."""

SUMMARY = "An rltk env plugin: route support tickets to the team that owns them."
"""The example's own one-line summary (pyproject description, package docstring): a new env gets
:data:`NEW_SUMMARY` in its place, since its workflow is not ticket triage."""

NEW_SUMMARY = "{name}: an rltk environment plugin (started from rltk envs new; describe your workflow here)"
"""The placeholder summary of a new env ``name``, to replace with a line on its workflow."""

PYPROJECT = f"""\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "rltk-ticket-triage"
version = "0.1.0"
description = "{SUMMARY}"
requires-python = ">=3.10"
dependencies = ["rltk"]

[project.entry-points."rltk.envs"]
ticket_triage = "ticket_triage.env:TicketTriageEnv"

[project.entry-points."rltk.rewards"]
ticket_triage_team = "ticket_triage.rewards:ticket_triage_team"

[tool.setuptools]
packages = ["ticket_triage"]
"""

INIT = f'''\
"""{SUMMARY}"""
'''

ENV = '''\
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
'''

TEACHER = '''\
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
'''

REWARDS = '''\
"""The reward: 1 for exactly the ticket's team, else 0."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rltk.reward import reward_fn
from ticket_triage.env import parse_team


@reward_fn(range=(0.0, 1.0))
def ticket_triage_team(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """1 if the completion is exactly the ticket's team; a hedge, padding or echo parses as nothing: 0.

    >>> ticket_triage_team(" billing", {"team": "billing"}, {})
    1.0
    >>> ticket_triage_team("billing or shipping", {"team": "billing"}, {})
    0.0
    """
    return 1.0 if parse_team(completion) == reference["team"] else 0.0
'''

RECIPE = """\
# The ticket_triage env with GRPO on the tiny random model (seconds a step on a CPU, learns nothing
# useful): set model.name to a real model (e.g. smollm2-135m-instruct) to train for real. `rltk train` this.
run:
  output_dir: runs/ticket_triage_grpo
  steps: 20
model:
  name: tiny
env:
  name: ticket_triage
rollout:
  prompts_per_step: 4
  group_size: 4
  max_new_tokens: 4
algorithm:
  name: grpo
optim:
  lr: 1.0e-4
eval:
  n: 50
"""

TEST = '''\
"""The ticket_triage env passes the env contract (``rltk envs check ticket_triage``)."""

from __future__ import annotations

from ticket_triage.env import TicketTriageEnv

from rltk.envcheck import format_results, run_checks
from rltk.plugins import get_env, list_envs


def test_listed_under_its_name() -> None:
    """Installed (pip install -e .), the env and its reward are found by name."""
    assert get_env("ticket_triage") is TicketTriageEnv
    assert "ticket_triage" in list_envs()


def test_env_contract() -> None:
    """What rltk envs check ticket_triage runs: splits, determinism, oracle, verdict, rewards, canaries."""
    results = run_checks("ticket_triage", {}, n=200)
    assert not [r for r in results if r.status == "fail"], format_results("ticket_triage", results)
'''

FILES = {
    "pyproject.toml": PYPROJECT,
    "ticket_triage/__init__.py": INIT,
    "ticket_triage/env.py": ENV,
    "ticket_triage/teacher.py": TEACHER,
    "ticket_triage/rewards.py": REWARDS,
    "recipes/ticket_triage_grpo.yaml": RECIPE,
    "tests/test_ticket_triage.py": TEST,
}
"""Path in the package → its text, for the name :data:`EXAMPLE`."""


def camel(name: str) -> str:
    """``ticket_triage`` → ``TicketTriage`` (the class name's stem).

    >>> camel("ticket_triage")
    'TicketTriage'
    """
    return "".join(part.capitalize() for part in name.split("_"))


def render(name: str) -> dict[str, str]:
    """The package's files for env ``name``: path → text (for :data:`EXAMPLE`, exactly :data:`FILES`).

    The example's names become ``name``'s, and its summary (:data:`SUMMARY`) the placeholder
    :data:`NEW_SUMMARY`.
    """
    subs = {EXAMPLE: name, camel(EXAMPLE): camel(name), EXAMPLE.replace("_", "-"): name.replace("_", "-")}
    if name != EXAMPLE:
        subs[SUMMARY] = NEW_SUMMARY.format(name=name)
    pattern = re.compile("|".join(re.escape(k) for k in sorted(subs, key=len, reverse=True)))
    return {
        pattern.sub(lambda m: subs[m[0]], p): pattern.sub(lambda m: subs[m[0]], t) for p, t in FILES.items()
    }


def check_name(name: str) -> None:
    """Raise :class:`PluginError` unless ``name`` can be a new env's name and its Python package name."""
    fix = "pick a lowercase identifier that is not taken, e.g. 'claims_triage'"
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise PluginError("env", name, "not a lowercase Python identifier (it names the package too)", fix)
    if name in list_envs() or f"{name}_team" in list_rewards():
        raise PluginError("env", name, "an env or reward of that name is already installed", fix)
    if importlib.util.find_spec(name) is not None:
        raise PluginError(
            "env", name, f"a Python module {name!r} already exists (the package would clash)", fix
        )


def write_package(name: str, parent: Path) -> Path:
    """Write the plugin package for env ``name`` into ``parent/name``; return that directory.

    Raises:
        PluginError: If the name is unusable or taken, or ``parent/name`` already exists.

    """
    check_name(name)
    return write_tree("env", name, Path(parent) / name, render(name))


def write_tree(kind: str, name: str, root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (relative path → text) under ``root``, which must not exist yet; return ``root``.

    Raises:
        PluginError: If ``root`` exists (nothing of it is overwritten).

    """
    if root.exists():
        raise PluginError(kind, name, f"{root} already exists", "remove it or pass another --dir")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root
