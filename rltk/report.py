"""Stage "eval", the proof report: a trained model beside the workflow it replaces.

Each policy plays the same held-out tasks. Models play them greedily (one sample, the deployed setting) and,
on the first ``sampled_tasks`` tasks, ``samples`` times at ``temperature``: pass@k and pass^k curves, and
best-of-N (:mod:`rltk.bestofn`, which never sees the reference). Scripted policies (the env's teacher, its
oracle and trivial policies) play once: they are deterministic. Every episode is an :class:`Attempt` (judged,
with its cost in tokens); :mod:`rltk.report_build` turns them into the report's numbers, with paired
bootstrap intervals for differences on the same tasks, and :mod:`rltk.report_render` writes ``report.md``
and ``report.png``.

    policies × tasks ──generate / run_policy──▶ Attempt [T] (greedy), [T', n] (sampled), [T'] (best-of-N)
                     ──report_build──▶ report.json ──report_render──▶ report.md, report.png

All model generation goes through :func:`rltk.rollout.generate`, as in training, so a faster sampler speeds
up both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rltk.batch import Rollout
from rltk.bestofn import Candidate, select
from rltk.env import Env, FinalAnswer, Policy, Task
from rltk.evaluate import judge, judged_groups, policy_rollouts
from rltk.progress import Progress
from rltk.reward import Rubric
from rltk.sampler import Sampler

PolicyKind = Literal["model", "teacher", "oracle", "trivial"]
UNSOLVED_STOP = 50  # a model that solves none of the first 50 tasks in any sample: sampling stops there


@dataclass(frozen=True)
class ReportSettings:
    """How the report samples and selects.

    Attributes:
        samples: n, samples per task for pass@k, pass^k and best-of-N (0: greedy only).
        sampled_tasks: T', how many of the tasks (the first) are sampled (None: all).
        bon: N, samples best-of-N picks from (the first N of the n; 0: no best-of-N).
        temperature: Sampling temperature of the sampled metrics.
        max_new_tokens: Tokens per assistant turn.
        batch_size: Episodes generated at once.
        seed: Seeds sampling and the bootstrap.

    """

    samples: int = 8
    sampled_tasks: int | None = None
    bon: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 16
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 0 or not 0 <= self.bon <= self.samples or self.temperature <= 0:
            raise ValueError(
                f"need samples >= 0, 0 <= bon <= samples and temperature > 0; got samples={self.samples}, "
                f"bon={self.bon}, temperature={self.temperature}"
            )


@dataclass
class Attempt:
    """One episode of one policy on one task: the env's verdict, the rubric's scores and the cost.

    Attributes:
        correct: The env judged it right.
        reward: The rubric's weighted sum (NaN when a reward or the env failed on it).
        scores: Per reward: its score, or None where not applicable.
        env_cost: The env's own cost of the outcome (``outcome["cost"]``), where it has one.
        generated_tokens: Tokens the model generated (None: a script, no model).
        context_tokens: Prompt and history tokens the model read, summed over its turns (each turn reads
            everything before it: the logical cost, not what a sampler's cache happened to recompute).
        turns: Assistant turns.
        tool_calls: Turns the env answered (tool calls; 0 for single-turn envs).
        mean_logp: Mean sampling log-prob per generated token (best-of-N's tie-break).
        answer: :meth:`Env.final_answer` of the episode (best-of-N's vote).

    """

    correct: bool
    reward: float
    scores: dict[str, float | None]
    env_cost: float | None
    generated_tokens: int | None
    context_tokens: int | None
    turns: int
    tool_calls: int
    mean_logp: float | None = None
    answer: FinalAnswer = None


@dataclass
class PolicyEval:
    """One policy's attempts at the report's tasks.

    Attributes:
        name: Row name (``base``, ``rl``, ``teacher``, ...).
        kind: ``model``, ``teacher``, ``oracle`` or ``trivial``.
        source: Where it came from (model path and step, the teacher's source hash, ...).
        greedy: ``[T]`` one attempt per task (models greedy).
        samples: ``[T', n]`` sampled attempts on the first T' tasks (models only).
        best_of_n: ``[T']`` the selector's pick per sampled task, costed at all N samples.
        seconds: Wall time per stage (``greedy``, ``sampled``).
        note: Anything a reader must know (e.g. sampling stopped early).

    """

    name: str
    kind: PolicyKind
    source: str
    greedy: list[Attempt]
    samples: list[list[Attempt]] | None = None
    best_of_n: list[Attempt] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    note: str | None = None


def attempt_of(env: Env, rollout: Rollout, prompt_len: int | None) -> Attempt:
    """A judged rollout as an :class:`Attempt`; ``prompt_len`` None: a scripted policy (no tokens)."""
    turns = len(rollout.turns)
    ended = rollout.stop_reason == "done" or prompt_len is None
    tool_calls = 0 if env.max_turns <= 1 else max(0, turns - 1) if ended else turns
    cost = rollout.outcome.get("cost")
    attempt = Attempt(
        correct=bool(rollout.outcome.get("correct")),
        reward=rollout.reward,
        scores=dict(rollout.scores),
        env_cost=float(cost) if isinstance(cost, (int, float)) else None,
        generated_tokens=None,
        context_tokens=None,
        turns=turns,
        tool_calls=tool_calls,
        answer=env.final_answer(rollout.task.messages, rollout.turns),
    )
    if prompt_len is not None:
        mask = rollout.loss_mask.tolist()  # [L] 1 = generated
        starts = [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]
        attempt.generated_tokens = sum(mask)
        attempt.context_tokens = sum(prompt_len + i for i in starts)
        attempt.mean_logp = float(rollout.sample_logp.sum()) / max(1, attempt.generated_tokens)
    return attempt


def evaluate_model(
    model: PreTrainedModel | Sampler,
    tokenizer: PreTrainedTokenizerBase,
    env: Env,
    rubric: Rubric,
    tasks: list[Task],
    settings: ReportSettings,
    name: str,
    source: str,
) -> PolicyEval:
    """A model's greedy attempts at every task, then its sampled attempts and best-of-N picks.

    Sampling stops after :data:`UNSOLVED_STOP` tasks when no sample of any of them was right (the report says
    so): best-of-N cannot pick a right answer that was never sampled.
    """
    s = settings

    def play(chunk: list[Task], group_size: int, temperature: float, seed: int) -> list[list[Attempt]]:
        """``group_size`` judged episodes per task (``temperature`` 0: greedy), as attempts ``[P, G]``."""
        groups = judged_groups(
            model, tokenizer, env, rubric, chunk, group_size=group_size, temperature=temperature,
            max_new_tokens=s.max_new_tokens, seed=seed,
        )  # fmt: skip
        return [[attempt_of(env, r, len(g.prompt_ids)) for r in g.rollouts] for g in groups]

    result = PolicyEval(name, "model", source, greedy=[])
    t0 = time.perf_counter()
    progress = Progress(f"{name}: greedy, {len(tasks)} tasks", len(tasks))
    for i in range(0, len(tasks), s.batch_size):
        chunk = tasks[i : i + s.batch_size]
        result.greedy += [a[0] for a in play(chunk, 1, 0.0, 0)]
        progress.update(len(chunk))
    progress.close()
    result.seconds["greedy"] = time.perf_counter() - t0
    if not s.samples:
        return result
    t0 = time.perf_counter()
    sampled = tasks[: s.sampled_tasks]
    per_call = max(1, s.batch_size // s.samples)
    progress = Progress(f"{name}: {s.samples} samples x {len(sampled)} tasks", len(sampled))
    result.samples = []
    for i in range(0, len(sampled), per_call):
        chunk = sampled[i : i + per_call]
        seed = s.seed + i  # per chunk: the same samples whatever came before
        result.samples += play(chunk, s.samples, s.temperature, seed)
        progress.update(len(chunk))
        solved = any(a.correct for row in result.samples for a in row)
        if len(result.samples) >= UNSOLVED_STOP and not solved:
            result.note = (
                f"sampling stopped after {len(result.samples)} tasks: none solved by any of {s.samples} "
                f"samples (pass@{s.samples} = 0), so best-of-{s.bon} is 0 there too"
            )
            break
    progress.close()
    result.seconds["sampled"] = time.perf_counter() - t0
    if s.bon:
        result.best_of_n = best_of_n(env, rubric, sampled[: len(result.samples)], result.samples, s.bon)
    return result


def best_of_n(
    env: Env, rubric: Rubric, tasks: list[Task], samples: list[list[Attempt]], n: int
) -> list[Attempt]:
    """Best-of-``n`` per task from its first ``n`` samples; each pick costs the tokens of all ``n``.

    Single-turn structured answers are voted per field and composed into one answer, which the env then
    judges; otherwise the pick is one of the samples (a multi-turn sample's episode acted on its own state).
    """
    if len(tasks) != len(samples):
        raise ValueError(f"best-of-n needs the samples of every task; got {len(samples)} for {len(tasks)}")
    picks: list[Attempt] = []
    composed: dict[int, str] = {}  # task index → per-field majority, written in the env's format
    for t, row in enumerate(row[:n] for row in samples):
        candidates = [Candidate(a.answer, a.mean_logp if a.mean_logp is not None else 0.0) for a in row]
        compose = env.max_turns <= 1 and any(isinstance(c.answer, dict) for c in candidates)
        pick = select(candidates, compose=compose)
        if pick.index is None and isinstance(pick.answer, dict):
            composed[t] = env.compose_answer(pick.answer)
        picks.append(_costed(row[pick.index or 0], row))  # a composed pick's verdict is replaced below
    if composed:
        idx = sorted(composed)
        judged = judge(env, rubric, [tasks[t] for t in idx], [composed[t] for t in idx])
        for t, rollout in zip(idx, judged, strict=True):
            picks[t] = _costed(attempt_of(env, rollout, None), samples[t][:n])
    return picks


def _costed(pick: Attempt, row: Sequence[Attempt]) -> Attempt:
    """``pick`` with the summed token cost and turns of every sample it was picked from."""

    def total(key: Callable[[Attempt], int | None]) -> int | None:
        values = [key(a) for a in row]
        return None if any(v is None for v in values) else sum(v for v in values if v is not None)

    return Attempt(
        **{
            **pick.__dict__,
            "generated_tokens": total(lambda a: a.generated_tokens),
            "context_tokens": total(lambda a: a.context_tokens),
            "turns": sum(a.turns for a in row),
            "tool_calls": sum(a.tool_calls for a in row),
        }
    )


def evaluate_script(
    env: Env, rubric: Rubric, tasks: list[Task], policy: Policy, name: str, kind: PolicyKind, source: str
) -> PolicyEval:
    """A scripted policy's attempts (teacher, oracle, trivial): one episode per task, no tokens."""
    t0 = time.perf_counter()
    attempts = [attempt_of(env, r, None) for r in policy_rollouts(env, rubric, tasks, policy)]
    return PolicyEval(name, kind, source, attempts, seconds={"greedy": time.perf_counter() - t0})


def scripted_policies(env: Env, rubric: Rubric, tasks: list[Task]) -> list[PolicyEval]:
    """The env's teacher (if it ships one), its oracle and its best trivial policy."""
    rows = []
    teacher = env.teacher()
    if teacher is not None:
        source = f"{type(teacher).__module__}.{type(teacher).__qualname__} sha256 {teacher.source_sha256()}"
        rows.append(evaluate_script(env, rubric, tasks, teacher, "teacher", "teacher", source))
    rows.append(evaluate_script(env, rubric, tasks, env.oracle, "oracle", "oracle", f"{env.name} oracle"))
    trivial = [
        evaluate_script(env, rubric, tasks, p, f"trivial: {n}", "trivial", n)
        for n, p in env.baselines().items()
    ]
    if trivial:
        rows.append(max(trivial, key=lambda r: (sum(a.correct for a in r.greedy), -trivial.index(r))))
    return rows
