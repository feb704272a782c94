"""``rltk rewards check NAME --env E``: score a reward on answers whose quality is known, before training.

    env tasks ──oracle──▶ right answers ─┐
              ──teacher─▶ mostly right ──┼──▶ the reward (as a recipe calls it) ──▶ per source: scores,
              ──canaries▶ degenerate ────┘                                          failures, time per call

Sources: the env's oracle (every answer right), its teacher (if it has one) and the generic canaries of
:mod:`rltk.canaries` (empty, whitespace, echoes of the prompts, the oracle answer padded or repeated, a hedge,
and another task's oracle answer: the well-formed wrong answer). A reward worth training on scores the oracle
above the wrong answer and no canary above the wrong answer. Flags:

* **no signal**: every source scores the same (a reward that reads the wrong format scores everything
  alike: ``len()`` of a one-message list is 1);
* the oracle's mean is not above the wrong answer's (it does not prefer right answers);
* a canary scores above the well-formed wrong answer on some task (it rewards a degenerate answer);
* calls that failed (raised, timed out, returned no valid score), or a reward that is never applicable.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rltk.canaries import WRONG, canaries, pick_wrong_answer

if TYPE_CHECKING:
    from rltk.batch import Rollout
    from rltk.env import Env, Message, Task
    from rltk.reward import RubricItem

TOL = 1e-9
RAMP = " .:-=+*#%@"
"""Histogram characters, from an empty bin to the fullest."""


@dataclass
class SourceStats:
    """What the reward gave one source of answers.

    Attributes:
        name: ``oracle``, ``teacher`` or ``canary:<name>``.
        scores: Per task: the score, or ``None`` (not applicable, or the call failed).
        not_applicable: Calls that returned ``None``.
        failures: What each failed call said (empty: none failed).
        seconds: Wall time of the source's calls.
        calls: Calls made (per-sample: one per task; batch: one for the source).

    """

    name: str
    scores: list[float | None]
    not_applicable: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    calls: int = 0

    @property
    def values(self) -> list[float]:
        """The scores given (neither ``None`` nor failed)."""
        return [s for s in self.scores if s is not None]

    @property
    def mean(self) -> float:
        """Mean of :attr:`values` (NaN when none)."""
        v = self.values
        return sum(v) / len(v) if v else math.nan


@dataclass
class CheckResult:
    """A reward checked on an env: the header facts, each source's stats and the flags raised."""

    reward: str
    env: str
    header: dict[str, str]
    sources: list[SourceStats]
    flags: list[str]


def _rollouts(env: Env, tasks: Sequence[Task], answer: Callable[[Task, list[Message]], str]) -> list[Rollout]:
    """One episode per task, played by ``answer(task, conversation)``; an env that raises gives no outcome."""
    import torch

    from rltk.batch import Rollout
    from rltk.env import run_policy

    empty = torch.zeros(0, dtype=torch.long)
    out = []
    for task in tasks:
        try:
            episode = run_policy(env, task, lambda m, t=task: answer(t, m))
            turns, outcome = episode.actions, dict(episode.outcome)
        except Exception as exc:  # the env's bug, not the reward's: scored with an empty verdict
            turns, outcome = [answer(task, list(task.messages))], {"env_error": repr(exc)}
        out.append(Rollout(task, turns or [""], empty, empty, empty.float(), outcome=outcome))
    return out


def _score(item: RubricItem, name: str, rollouts: list[Rollout], timeout_s: float) -> SourceStats:
    from rltk.batch import Group
    from rltk.reward import Rubric

    rubric = Rubric([item], timeout_s=timeout_s, workers=1)
    quiet = logging.getLogger("rltk.reward")  # failures are counted here, not logged per source
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        rubric.score([Group(rollouts[0].task, rollouts[0].token_ids, rollouts[:1])])  # start the worker
        started = time.perf_counter()
        rubric.score([Group(rollouts[0].task, rollouts[0].token_ids, rollouts)])
        seconds = time.perf_counter() - started
    finally:
        rubric.close()
        quiet.setLevel(level)
    stats = SourceStats(
        name, [], seconds=seconds, calls=1 if item.contract.form == "batch" else len(rollouts)
    )
    for r in rollouts:
        mine = [f for f in r.failures if f.source == item.name]
        stats.failures += [f"{f.kind}: {f.detail}" for f in mine]
        score = None if mine else r.scores.get(item.name)
        stats.not_applicable += int(not mine and score is None)
        stats.scores.append(score)
    return stats


def _flags(sources: list[SourceStats], lo_hi: tuple[float, float]) -> list[str]:
    flags = []
    width = max(1.0, lo_hi[1] - lo_hi[0])
    everything = [v for s in sources for v in s.values]
    if everything and max(everything) - min(everything) <= TOL * width:
        names = ", ".join(s.name for s in sources if not s.name.startswith("canary:"))
        flags.append(
            f"no signal: it scores every answer {everything[0]:g} ({names} and every canary alike); "
            "check what "
            "it reads (format: text passes strings, format: messages lists of messages)"
        )
    by_name = {s.name: s for s in sources}
    wrong, oracle = by_name.get(f"canary:{WRONG}"), by_name.get("oracle")
    if wrong and oracle and wrong.values and oracle.values and not oracle.mean > wrong.mean + TOL * width:
        flags.append(
            f"the oracle (mean {oracle.mean:.3f}) does not score above the well-formed wrong answer "
            f"(mean {wrong.mean:.3f}): it does not prefer right answers"
        )
    for s in sources:
        if wrong is None or not s.name.startswith("canary:") or s is wrong:
            continue
        pairs = [
            (c, w) for c, w in zip(s.scores, wrong.scores, strict=True) if c is not None and w is not None
        ]
        above = [(c, w) for c, w in pairs if c > w + TOL * width]
        if above:
            mean_c, mean_w = (sum(x) / len(above) for x in zip(*above, strict=True))
            flags.append(
                f"{s.name} scores above the well-formed wrong answer on {len(above)}/{len(pairs)} tasks "
                f"(there: mean {mean_c:.3f} vs {mean_w:.3f})"
            )
    for s in sources:
        if s.failures:
            flags.append(f"{s.name}: {len(s.failures)} answers failed (a reward bug); first: {s.failures[0]}")
    if sources and all(not s.values and not s.failures for s in sources):
        flags.append("it returns None (not applicable) for every answer of every task")
    return flags


def check_reward(
    name: str,
    env: Env,
    *,
    params: Mapping[str, Any] | None = None,
    format: str = "auto",
    n: int = 50,
    split: str = "eval",
    seed: int = 0,
    timeout_s: float = 10.0,
) -> CheckResult:
    """Score reward ``name`` (as a recipe would call it) on ``n`` tasks' oracle, teacher and canary answers.

    Raises:
        rltk.plugins.PluginError: The name does not resolve, or the reward cannot be called with ``params``
            on this env's tasks (every problem named, with its fix).

    """
    from rltk import plugins
    from rltk.reward import RubricItem
    from rltk.reward_contract import contract_problems

    fn = plugins.get_reward(name)
    env_params = (getattr(env, "default_reward_params", None) or {}).get(name, {})
    params = {**env_params, **(params or {})}
    tasks = env.tasks(split, n, seed=seed)
    if len(tasks) < 2:
        raise plugins.PluginError("reward", name, f"env '{env.name}' gave {len(tasks)} tasks", "use --n >= 2")
    problems = contract_problems(fn, params, format, {k for t in tasks for k in t.reference})
    if problems:
        why = "; ".join(f"{p}: {w}" if p and p not in w else w for p, w, _ in problems)
        raise plugins.PluginError(
            "reward", name, why, "; ".join(f.replace("rewards.N.", "") for *_, f in problems)
        )
    item = RubricItem(name, fn, 1.0, params, True, format)
    oracle = _rollouts(env, tasks, lambda t, m: env.oracle(m))
    answers = [r.turns[-1] for r in oracle]
    sources = [_score(item, "oracle", oracle, timeout_s)]
    teacher = env.teacher()
    if teacher is not None:
        sources.append(_score(item, "teacher", _rollouts(env, tasks, lambda t, m: teacher(m)), timeout_s))
    per_task: dict[str, dict[str, str]] = {}
    for i, task in enumerate(tasks):
        others = answers[i + 1 :] + answers[:i]
        wrong = pick_wrong_answer(env, task, others, answers[i]) or others[0]
        per_task[task.id] = dict(canaries(env, task, answers[i], wrong))
    first = per_task[tasks[0].id]
    for canary in [k for k in first if all(k in c for c in per_task.values())]:
        played = _rollouts(env, tasks, lambda t, m, c=canary: per_task[t.id][c])
        sources.append(_score(item, f"canary:{canary}", played, timeout_s))
    lo_hi = item.range or _observed(sources)
    header = {
        "form": "batch (TRL)" if item.contract.form == "batch" else "per-sample",
        "format": item.contract.format,
        "range": "undeclared" if item.range is None else f"[{item.range[0]:g}, {item.range[1]:g}]",
        "version": str(getattr(fn, "reward_version", "") or "-"),
        "split": split,
        "tasks": str(len(tasks)),
        "params": str(params or "{}"),
    }
    return CheckResult(name, env.name, header, sources, _flags(sources, lo_hi))


def _observed(sources: list[SourceStats]) -> tuple[float, float]:
    values = [v for s in sources for v in s.values] or [0.0]
    return min(values), max(values)


def histogram(values: Sequence[float], lo: float, hi: float, bins: int = 10) -> str:
    """``values`` in ``bins`` equal bins over ``[lo, hi]``, one character each (:data:`RAMP`: empty to full).

    >>> histogram([0.0, 0.0, 1.0], 0.0, 1.0, bins=4)
    '@  ='
    """
    counts = [0] * bins
    for v in values:
        k = 0 if hi <= lo else int((v - lo) / (hi - lo) * bins)
        counts[min(bins - 1, max(0, k))] += 1
    top = max(counts) or 1
    return "".join(RAMP[0] if c == 0 else RAMP[max(1, round(c / top * (len(RAMP) - 1)))] for c in counts)


def render(result: CheckResult) -> str:
    """The check as text: a header, one row per source, then the flags (or that there are none)."""
    h = result.header
    lo, hi = _observed(result.sources)
    if h["range"] != "undeclared":
        lo, hi = (float(x) for x in h["range"].strip("[]").split(","))
    lines = [
        f"reward {result.reward}: {h['form']}, format {h['format']}, range {h['range']}, "
        f"version {h['version']}",
        f"env {result.env}, split {h['split']}, {h['tasks']} tasks, params {h['params']}",
        "",
        f"{'source':<22} {'scored':>6} {'n/a':>4} {'failed':>6} {'mean':>8} {'min':>8} {'max':>8}  "
        f"{'histogram':<12} {'ms/call':>8} {'calls':>5}",
    ]
    for s in result.sources:
        v = s.values
        stats = f"{s.mean:8.3f} {min(v):8.3f} {max(v):8.3f}" if v else f"{'-':>8} {'-':>8} {'-':>8}"
        ms = 1000 * s.seconds / max(1, s.calls)
        lines.append(
            f"{s.name:<22} {len(v):>6} {s.not_applicable:>4} {len(s.failures):>6} {stats}  "
            f"|{histogram(v, lo, hi)}| {ms:8.2f} {s.calls:>5}"
        )
    lines += ["", f"histogram: 10 bins over [{lo:g}, {hi:g}], '{RAMP[1]}' few to '{RAMP[-1]}' most", ""]
    if result.flags:
        lines += [f"FLAGGED ({len(result.flags)}):", *(f"  - {f}" for f in result.flags)]
    else:
        lines.append("ok: the oracle scores above the wrong answer and no canary does")
    return "\n".join(lines)
