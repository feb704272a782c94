"""Stage 1, env: where tasks come from and how outcomes are judged.

An environment is a workflow the model must learn. It produces :class:`Task` objects by split and seed,
runs one :class:`Episode` per rollout (one assistant turn for single-turn envs, several for tool use),
judges the outcome, and ships a scripted ``oracle`` that solves every task from what the model sees and a
:class:`Teacher`: the imperfect scripted workflow the model is meant to replace.

    env.tasks(split, n, seed) ──Task──▶ env.episode(task) ──step(action)──▶ Step(observation, done)
                                                              └──▶ episode.outcome (the env's verdict)

The verdict is an :class:`Outcome` (``correct``, ``answer``, ``cost``, ``extra``; also a read-only
mapping), or a dict with a bool ``correct`` that the engine turns into one (:meth:`Outcome.of`). Whatever
breaks the contract (a verdict without ``correct``, an oracle returning None, ``default_rewards`` as a list,
a task field of the wrong type) raises :class:`EnvContractError` naming the env and the fix
(:mod:`rltk.contract`); ``rltk envs check NAME`` runs the whole contract (:mod:`rltk.envcheck`).

Splits are disjoint by construction: :func:`split_of` assigns every rendered prompt to exactly one split
by its hash, and generators keep only candidates whose prompt hashes into the split asked for.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from rltk.contract import EnvContractError, EnvContractWarning, Outcome, check_action, check_task, env_name
from rltk.durable import source_sha256

__all__ = [
    "SPLITS",
    "Env",
    "EnvContractError",
    "EnvContractWarning",
    "Episode",
    "Outcome",
    "SingleTurnEpisode",
    "Step",
    "Task",
    "Teacher",
    "check_choice",
    "draw_task",
    "prompt_hash",
    "run_policy",
    "solves",
    "split_of",
]

Split = Literal["train", "eval", "test"]
SPLITS: tuple[Split, ...] = ("train", "eval", "test")
Message = dict[str, str]  # {"role": "system" | "user" | "assistant" | "tool", "content": str}
Policy = Callable[[list[Message]], str]  # conversation so far → next assistant text
# An episode's final answer read back without the reference: a vote key (best-of-N), or per-field keys.
FinalAnswer = Hashable | dict[str, Hashable] | None


@dataclass(frozen=True)
class Task:
    """One problem instance.

    Attributes:
        id: Stable id, unique within the env (e.g. ``"policy_flagging/eval/17"``).
        split: ``"train"``, ``"eval"`` or ``"test"``.
        messages: The chat the model sees first (system + user turns).
        reference: What the outcome check and the rewards need (gold label, ...). Never shown to the model
            or to the oracle.
        info: Descriptive tags for breakdowns in reports (difficulty, rule id, near-miss flag, ...).
        tools: JSON schemas (OpenAI function format) of the tools, where the env uses the chat template's
            native tool calling (:mod:`rltk.tools`): the template renders them with the prompt, and the env's
            answers are ``tool`` turns. ``None``: no native tools (text protocol, or none at all).

    """

    id: str
    split: str
    messages: list[Message]
    reference: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        check_task(self)  # a generator's type slip fails here, naming the task, not deep in the engine

    @property
    def observation_role(self) -> str:
        """The role of the env's answers in the conversation: ``tool`` with native tools, else ``user``."""
        return "user" if self.tools is None else "tool"


@dataclass
class Step:
    """What the env answers to one assistant turn.

    Attributes:
        observation: Text the env replies with (a tool result, an error message); rendered as the next
            ``user`` turn (``tool`` turn with native tools: ``Task.observation_role``). ``None`` when the
            episode is over.
        done: True once the episode has ended (final answer given, or a limit hit).

    """

    observation: str | None
    done: bool


class Episode(ABC):
    """The state of one rollout of one task. Each rollout gets its own episode: state is never shared."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.actions: list[str] = []
        # the verdict: an Outcome or a dict with a bool "correct"; not correct until the episode says so
        self.outcome: Mapping[str, Any] = Outcome(correct=False)

    @abstractmethod
    def step(self, action: str) -> Step:
        """Apply one assistant turn; must never raise on malformed model output."""


class SingleTurnEpisode(Episode):
    """An episode that ends after the first assistant turn; the outcome comes from ``Env.check``."""

    def __init__(self, task: Task, env: Env) -> None:
        super().__init__(task)
        self._env = env

    def step(self, action: str) -> Step:  # noqa: D102
        self.actions.append(action)
        self.outcome = Outcome.of(env_name(self._env), self._env.check(self.task, action))
        return Step(observation=None, done=True)


class Teacher(ABC):
    """The imperfect scripted workflow a company runs today: the policy a trained model must beat.

    Like the oracle, a teacher reads only the conversation (never ``Task.reference``, never the oracle), so
    it is a policy: ``teacher(messages) -> next assistant text``. Unlike the oracle it errs, systematically,
    on cues visible in the prompt (a layout its templates miss, a stale threshold, a question shape its chain
    does not cover), so SFT on its demonstrations copies its errors rather than averaging them out. Its
    output is always in the env's answer format: beating it is never a matter of format.

    Subclasses live in their own module, which :meth:`source_sha256` hashes: a report that uses a teacher
    records the hash, so a teacher changed after a report was made shows as a different hash.

    Attributes:
        weak_slices: ``Task.info`` key → the values of the slices it gets wrong by design (for tests and
            reports: at least 90% of its errors fall in these slices).

    """

    weak_slices: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @abstractmethod
    def __call__(self, messages: list[Message]) -> str:
        """The next assistant turn for the conversation so far."""

    def in_weak_slice(self, task: Task) -> bool:
        """True when ``task`` lies in one of the slices the teacher is known to get wrong."""
        return any(task.info.get(key) in values for key, values in self.weak_slices.items())

    def source_sha256(self) -> str:
        """Sha256 of the module that defines this teacher's class (the teacher's frozen identity)."""
        digest = source_sha256(type(self))
        if digest is None:
            raise ValueError(f"cannot find the source file of teacher {type(self).__qualname__}")
        return digest


class Env(ABC):
    """Base class of every environment (built-in or plugin).

    Subclasses set ``name``/``description``, implement ``tasks``, ``check`` and ``oracle``, and may
    override ``episode`` for multi-turn workflows, ``baselines`` for trivial policies, ``teacher`` for the
    workflow the model replaces, and ``final_answer``/``compose_answer`` for best-of-N voting.
    """

    name: ClassVar[str]
    description: ClassVar[str]  # one line, shown by `rltk envs list`
    max_turns: ClassVar[int] = 1  # assistant turns per episode at most (tool use: several)
    max_new_tokens: int = 16  # tokens one assistant turn needs at most (rltk eval's default; per instance)
    stop_strings: tuple[str, ...] = ()  # a turn ends at these (tool envs: their ToolProtocol's, per instance)
    default_rewards: ClassVar[dict[str, float]] = {}  # reward name → weight when a recipe names none
    # False: the env keeps its splits apart by its own rule (the dataset env hashes row keys, so that editing
    # the prompt template moves no row); `rltk envs check` then only checks that no prompt is in two splits.
    splits_by_prompt_hash: ClassVar[bool] = True

    def __init__(self, **options: Any) -> None:
        """Take env options from the recipe's ``env.options``; unknown options raise ``ValueError``.

        Subclasses declare their options as keyword arguments and pass the rest (``**options``) here, which
        names the unknown ones and lists the valid ones, read from the subclass's signature.
        """
        if options:
            params = inspect.signature(type(self).__init__).parameters.values()
            valid = ", ".join(p.name for p in params if p.name != "self" and p.kind is not p.VAR_KEYWORD)
            raise ValueError(
                f"env '{self.name}' got unknown options {sorted(options)}; valid: {valid or '(none)'}"
            )

    @abstractmethod
    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """Return ``n`` tasks of ``split``; the same (split, n, seed) always gives the same tasks."""

    @abstractmethod
    def check(self, task: Task, completion: str) -> Outcome | dict[str, Any]:
        """Judge a final answer: the env's verdict, an :class:`Outcome` or a dict with a bool ``correct``.

        E.g. ``Outcome(correct=True, answer="FLAG", extra={"rule": "R1"})`` or ``{"correct": True, "answer":
        "FLAG", "rule": "R1"}``; ``answer`` (the parsed answer class) is what ``algorithm.balance_answers``
        balances, ``cost`` what reports add up. It never raises on malformed model output.
        """

    @abstractmethod
    def oracle(self, messages: list[Message]) -> str:
        """A scripted policy that solves every task from the conversation alone (never the reference)."""

    def episode(self, task: Task) -> Episode:
        """Start one rollout's episode. Multi-turn envs return their own :class:`Episode`."""
        return SingleTurnEpisode(task, self)

    def baselines(self) -> dict[str, Policy]:
        """Trivial policies to report beside the model: constant answers, single-rule heuristics."""
        return {}

    def teacher(self) -> Teacher | None:
        """The imperfect scripted workflow this env's model replaces; None where the env ships none."""
        return None

    def final_answer(self, messages: list[Message], actions: list[str]) -> FinalAnswer:
        """An episode's final answer, parsed without the reference: what best-of-N votes on.

        Args:
            messages: The task's first messages (what the model saw first).
            actions: The assistant turns of the episode.

        Returns:
            A hashable vote key; or ``{field: key}`` for structured answers (voted per field); or None when
            the answer does not parse or fails a reference-free check (the sample abstains). The default is
            the last turn, stripped.

        """
        return actions[-1].strip() if actions and actions[-1].strip() else None

    def compose_answer(self, fields: dict[str, Hashable]) -> str:
        """Write per-field voted answers back as one answer in the env's format.

        Needed by single-turn envs whose :meth:`final_answer` returns dicts (the best-of-N pick is then the
        per-field majority, composed into one answer and judged like any other).
        """
        raise NotImplementedError(f"env {self.name!r} votes on whole answers, not fields")


def prompt_hash(messages: list[Message]) -> str:
    """Sha256 of a rendered conversation (canonical JSON).

    >>> prompt_hash([{"role": "user", "content": "hi"}])[:12]
    '5aced9397fc4'
    """
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def split_of(messages: list[Message], weights: tuple[int, int, int] = (8, 1, 1)) -> Split:
    """The one split a prompt belongs to, from its hash: train/eval/test in ``weights`` proportions.

    >>> split_of([{"role": "user", "content": "hi"}]) in SPLITS
    True
    """
    bucket = int(prompt_hash(messages)[:8], 16) % sum(weights)
    if bucket < weights[0]:
        return "train"
    return "eval" if bucket < weights[0] + weights[1] else "test"


def check_choice(option: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``: the check of an env option or a split.

    >>> check_choice("split", "eval", SPLITS)
    >>> check_choice("difficulty", "expert", ("easy", "hard"))
    Traceback (most recent call last):
    ...
    ValueError: difficulty must be one of ('easy', 'hard'), got 'expert'
    """
    if value not in choices:
        raise ValueError(f"{option} must be one of {choices}, got {value!r}")


def draw_task(
    split: str, seen: set[str], candidate: Callable[[int], Task | None], attempts: int = 100_000
) -> Task:
    """The first ``candidate(attempt)`` that lies in ``split`` by its prompt hash and is not in ``seen``.

    The rejection loop every generator uses to keep splits disjoint by construction: ``candidate`` draws one
    task from a seed that includes ``attempt`` (and returns None for a degenerate draw); the task's prompt
    hash is added to ``seen``.

    Raises:
        RuntimeError: If no candidate qualifies within ``attempts`` draws.

    """
    for attempt in range(attempts):
        task = candidate(attempt)
        if task is None or split_of(task.messages) != split:
            continue
        digest = prompt_hash(task.messages)
        if digest not in seen:
            seen.add(digest)
            return task
    raise RuntimeError(f"could not draw a new task of split {split!r} in {attempts} attempts")


def run_policy(env: Env, task: Task, policy: Policy, transcript: list[Message] | None = None) -> Episode:
    """Play one episode with a text policy (oracle, baseline, or a model wrapped as a function).

    ``transcript``, if given, receives the whole conversation: the task's messages, then each action and the
    env's answer to it. The episode's ``outcome`` is returned as an :class:`Outcome`.

    Raises:
        EnvContractError: If the policy returns anything but a str, or the verdict is not one.

    """
    episode = env.episode(task)
    messages = transcript if transcript is not None else []
    messages.extend(task.messages)
    for _ in range(env.max_turns):
        action = check_action(env_name(env), policy, policy(messages))
        step = episode.step(action)
        messages.append({"role": "assistant", "content": action})
        if step.done:
            break
        messages.append({"role": task.observation_role, "content": step.observation or ""})
    episode.outcome = Outcome.of(env_name(env), episode.outcome, "the episode's outcome")
    return episode


def solves(env: Env, task: Task, policy: Policy) -> bool:
    """True when the env verifies ``policy``'s episode of ``task`` correct (its outcome's ``correct``).

    The audit of a workflow's logs: which teacher episodes an outcome-filtered SFT keeps, and which tasks
    make the teacher's error slice.
    """
    return bool(run_policy(env, task, policy).outcome["correct"])
