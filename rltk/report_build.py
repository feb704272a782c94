"""The proof report's numbers: a report's policies' attempts (:mod:`rltk.report`) → one JSON-ready dict.

Accuracy with bootstrap intervals, rewards, per-tag accuracy, per-field errors and token costs per
policy; pass@k and pass^k curves and best-of-N from the sampled attempts; the candidate's (the last
model's) paired differences against every other row. Everything but ``timings`` is a function of the
attempts and the seed.
"""

from __future__ import annotations

import math
import platform
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from rltk import estimators
from rltk.env import Env, Task
from rltk.report import Attempt, PolicyEval, ReportSettings


def _mean(values: Sequence[float | int | None]) -> float | None:
    real = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(real) / len(real) if real else None


def _accuracy(attempts: Sequence[Attempt], seed: int) -> dict[str, Any]:
    acc, low, high = estimators.bootstrap_mean([float(a.correct) for a in attempts], seed)
    return {"tasks": len(attempts), "accuracy": acc, "ci95": [low, high]}


def _costs(attempts: Sequence[Attempt]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "generated_tokens": _mean([a.generated_tokens for a in attempts]),
        "context_tokens": _mean([a.context_tokens for a in attempts]),
        "turns": _mean([a.turns for a in attempts]),
        "tool_calls": _mean([a.tool_calls for a in attempts]),
    }
    cost = _mean([a.env_cost for a in attempts])
    if cost is not None:
        out["env_cost_per_1000"] = 1000 * cost
    return out


def _field_errors(p: PolicyEval, oracle: PolicyEval | None) -> dict[str, float]:
    """Per answer field, the share of tasks whose greedy answer differs from the oracle's.

    Only for structured answers (:meth:`Env.final_answer` a dict of normalized fields); an answer that is
    not one (unparseable) has every field wrong. Empty without an oracle row.
    """
    if oracle is None:
        return {}
    pairs = [(a.answer, o.answer) for a, o in zip(p.greedy, oracle.greedy, strict=True)]
    pairs = [(a if isinstance(a, dict) else None, o) for a, o in pairs if isinstance(o, dict)]
    keys = sorted({k for _, o in pairs for k in o})
    wrong = {k: sum(a is None or a.get(k) != o.get(k) for a, o in pairs) for k in keys}
    return {k: n / len(pairs) for k, n in wrong.items()}


def tag_tasks(tasks: list[Task]) -> dict[str, list[int]]:
    """``key=value`` of the tasks' scalar ``info`` tags, each with the indices of its tasks.

    A tag every task has is no breakdown: it is left out.
    """
    tags: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(tasks):
        for key, value in task.info.items():
            if isinstance(value, (str, bool, int)) or value is None:
                tags[f"{key}={value}"].append(i)
    return {k: v for k, v in sorted(tags.items()) if len(v) < len(tasks)}


def _greedy(p: PolicyEval, tasks: list[Task], seed: int, oracle: PolicyEval | None) -> dict[str, Any]:
    names = sorted({k for a in p.greedy for k in a.scores})
    return {
        **_accuracy(p.greedy, seed),
        "mean_reward": _mean([a.reward for a in p.greedy]),
        "rewards": {n: _mean([a.scores.get(n) for a in p.greedy]) for n in names},
        "failed": sum(math.isnan(a.reward) for a in p.greedy),
        "by_tag": {k: sum(p.greedy[i].correct for i in v) / len(v) for k, v in tag_tasks(tasks).items()},
        "field_errors": _field_errors(p, oracle),
        **_costs(p.greedy),
    }


def _sampled(p: PolicyEval, s: ReportSettings) -> dict[str, Any] | None:
    if not p.samples:
        return None
    counts = [sum(a.correct for a in row) for row in p.samples]
    flat = [a for row in p.samples for a in row]
    return {
        "tasks": len(p.samples),
        "n": s.samples,
        "temperature": s.temperature,
        **{  # string keys: the report reads the same from memory and from report.json
            name: {str(k): v for k, v in values.items()}
            for name, values in estimators.curve(s.samples, counts).items()
        },
        **_costs(flat),
        "stopped_early": p.note,
    }


def _best_of_n(p: PolicyEval, s: ReportSettings) -> dict[str, Any] | None:
    if not p.best_of_n or not p.samples:
        return None
    counts = [sum(a.correct for a in row[: s.bon]) for row in p.samples]
    return {
        "n": s.bon,
        **_accuracy(p.best_of_n, s.seed),
        "abstained": _mean([float(a.answer is None) for row in p.samples for a in row[: s.bon]]),
        "pass_at_n_upper_bound": sum(c > 0 for c in counts) / len(counts),
        **_costs(p.best_of_n),
    }


def _differences(policies: list[PolicyEval], s: ReportSettings) -> list[dict[str, Any]]:
    """The candidate (the last model) against every other row, paired on the same tasks."""
    models = [p for p in policies if p.kind == "model"]
    if not models:
        return []
    cand = models[-1]
    mine = [float(a.correct) for a in cand.greedy]
    out = []
    for p in policies:
        rows = [("greedy", p.greedy)] if p is not cand else []
        rows += [(f"best-of-{s.bon}", p.best_of_n)] if p.best_of_n else []
        for label, attempts in rows:
            theirs = [float(a.correct) for a in attempts or []]
            diff, low, high = estimators.paired_difference(mine[: len(theirs)], theirs, s.seed)
            out.append(
                {
                    "a": f"{cand.name} greedy",
                    "b": f"{p.name} {label}",
                    "tasks": len(theirs),
                    "diff": diff,
                    "ci95": [low, high],
                }
            )
    return out


def build_report(
    env: Env,
    tasks: list[Task],
    policies: list[PolicyEval],
    settings: ReportSettings,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """The report as a JSON-ready dict; ``timings`` holds everything that varies between identical runs."""
    teacher = env.teacher()
    oracle = next((p for p in policies if p.kind == "oracle"), None)
    return {
        "env": env.name,
        **meta,
        "tasks": len(tasks),
        "settings": {
            "samples": settings.samples,
            "sampled_tasks": len(tasks[: settings.sampled_tasks]),
            "bon": settings.bon,
            "temperature": settings.temperature,
            "max_new_tokens": settings.max_new_tokens,
            "seed": settings.seed,
            "selector": "majority vote over Env.final_answer (per field for structured answers), "
            "unparseable samples abstain, ties to the higher mean log-prob; never reads the reference",
        },
        "teacher_sha256": teacher.source_sha256() if teacher is not None else None,
        "tag_tasks": {k: len(v) for k, v in tag_tasks(tasks).items()},
        "intervals": "paired bootstrap 95% over tasks (2000 resamples): they cover eval noise only, "
        "each model being one training seed",
        "policies": [
            {
                "name": p.name,
                "kind": p.kind,
                "source": p.source,
                "greedy": _greedy(p, tasks, settings.seed, oracle),
                "sampled": _sampled(p, settings),
                "best_of_n": _best_of_n(p, settings),
            }
            for p in policies
        ],
        "differences": _differences(policies, settings),
        "timings": {
            "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "seconds_per_task": {
                p.name: {
                    k: v / max(1, len(p.greedy if k == "greedy" else p.samples or []))
                    for k, v in p.seconds.items()
                }
                for p in policies
            },
        },
    }
