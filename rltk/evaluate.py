"""Stage "eval": a policy × an env × a split → a report, always beside the trivial policies.

A policy is the model (greedy, one sample), the env's oracle, or one of the env's baselines (constant
answers, single-rule heuristics). Learning the answer format is not learning the task: every report shows
the best trivial policy next to the model, and per-tag accuracies (e.g. recall per rule).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rltk.batch import Failure, Group, Rollout
from rltk.env import Env, Outcome, Policy, Task, run_policy
from rltk.reward import Rubric
from rltk.rollout import ENV_TIMEOUT_S, generate, guarded_step
from rltk.sampler import Sampler

if TYPE_CHECKING:
    from rltk.config import Config

_EMPTY = torch.zeros(0, dtype=torch.long)


@dataclass
class EvalResult:
    """One policy's scores on one set of tasks.

    Attributes:
        name: Policy name (``base``, ``trained``, ``oracle``, ``constant_clear``, ...).
        n: Number of tasks.
        accuracy: Share of tasks the env judged correct.
        mean_reward: Mean rubric reward.
        by_tag: ``{"rule=R1": accuracy, "near_miss=True": accuracy, ...}`` over ``Task.info`` tags.

    """

    name: str
    n: int
    accuracy: float
    mean_reward: float
    by_tag: dict[str, float] = field(default_factory=dict)


def judged_groups(
    model: PreTrainedModel | Sampler,
    tokenizer: PreTrainedTokenizerBase,
    env: Env,
    rubric: Rubric,
    tasks: list[Task],
    *,
    group_size: int,
    temperature: float,
    max_new_tokens: int,
    seed: int | None = None,
) -> list[Group]:
    """``group_size`` episodes of each task from the rollout engine (``temperature`` 0: greedy), judged.

    The one way eval plays a model (held-out evals, ``rltk eval``, the proof report): the sampler training
    uses (:func:`rltk.rollout.generate`), single- and multi-turn alike, then the env's verdict and the rubric.
    """
    groups = generate(
        model,
        tokenizer,
        env,
        tasks,
        group_size=group_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
    rubric.score(groups)
    return groups


def judge(
    env: Env,
    rubric: Rubric,
    tasks: list[Task],
    answers: list[str],
    env_timeout_s: float | None = ENV_TIMEOUT_S,
) -> list[Rollout]:
    """Single-turn ``answers`` as rollouts judged by the env and scored by the rubric, one per task.

    A check that raises or runs past ``env_timeout_s`` on an answer fails that rollout (judged incorrect).
    """
    groups = []
    for task, answer in zip(tasks, answers, strict=True):
        episode = env.episode(task)
        step = guarded_step(episode, answer, env_timeout_s)
        failures = [step] if isinstance(step, Failure) else []
        outcome = Outcome.of(env.name, episode.outcome)
        rollout = Rollout(task, [answer], _EMPTY, _EMPTY, _EMPTY.float(), outcome, failures=failures)
        groups.append(Group(task, _EMPTY, [rollout]))
    rubric.score(groups)
    return [g.rollouts[0] for g in groups]


def run_eval_setup(cfg: Config, n: int, env_name: str | None = None) -> tuple[Env, Rubric, list[Task], int]:
    """A run's env, rubric, ``n`` eval tasks (seed 0) and turn budget, as its own evals use them.

    ``env_name`` other than the run's: that env with its default options and rewards, and its budget.
    The budget is ``eval.max_new_tokens``, else the env's ``max_new_tokens``.
    """
    from rltk import plugins

    same = env_name in (None, cfg.env.name)
    env = plugins.make_env(cfg.env.name if same else str(env_name), cfg.env.options if same else {})
    rubric = Rubric.from_config(cfg.rewards if same else [], env, timeout_s=cfg.rollout.reward_timeout_s)
    budget = (cfg.eval.max_new_tokens if same else None) or env.max_new_tokens
    return env, rubric, env.tasks("eval", n, seed=0), budget


def score(env: Env, rubric: Rubric, tasks: list[Task], answers: list[str], name: str) -> EvalResult:
    """Judge single-turn ``answers`` with the env and the rubric."""
    return summarize(name, judge(env, rubric, tasks, answers))


def model_result(
    model: PreTrainedModel | Sampler,
    tokenizer: PreTrainedTokenizerBase,
    env: Env,
    rubric: Rubric,
    tasks: list[Task],
    max_new_tokens: int,
    name: str,
    batch_size: int = 32,
) -> EvalResult:
    """The model's greedy score on ``tasks``: one answer per task, or whole episodes for multi-turn envs.

    Multi-turn episodes are played by the rollout engine (greedy, one rollout per task), with the env's
    ``max_turns`` and stop strings, exactly as in training.
    """
    return summarize(name, model_rollouts(model, tokenizer, env, rubric, tasks, max_new_tokens, batch_size))


def model_rollouts(
    model: PreTrainedModel | Sampler,
    tokenizer: PreTrainedTokenizerBase,
    env: Env,
    rubric: Rubric,
    tasks: list[Task],
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[Rollout]:
    """The judged greedy rollouts behind :func:`model_result`, one per task in the order of ``tasks``."""
    rollouts: list[Rollout] = []
    for i in range(0, len(tasks), batch_size):
        chunk = tasks[i : i + batch_size]
        groups = judged_groups(
            model, tokenizer, env, rubric, chunk, group_size=1, temperature=0.0, max_new_tokens=max_new_tokens
        )
        rollouts += [g.rollouts[0] for g in groups]
    return rollouts


def evaluate_policy(env: Env, rubric: Rubric, tasks: list[Task], policy: Policy, name: str) -> EvalResult:
    """Run a text policy (oracle, baseline) through full episodes (multi-turn aware) and score it."""
    return summarize(name, policy_rollouts(env, rubric, tasks, policy))


def policy_rollouts(env: Env, rubric: Rubric, tasks: list[Task], policy: Policy) -> list[Rollout]:
    """A text policy's judged episodes, one per task (no tokens: the policy is a script)."""
    rollouts = []
    for task in tasks:
        episode = run_policy(env, task, policy)
        rollouts.append(
            Rollout(task, episode.actions, _EMPTY, _EMPTY, _EMPTY.float(), outcome=episode.outcome)
        )
    rubric.score([Group(r.task, _EMPTY, [r]) for r in rollouts])
    return rollouts


def summarize(name: str, rollouts: list[Rollout]) -> EvalResult:
    """Accuracy, mean reward and per-tag accuracy of judged rollouts."""
    correct = [bool(r.outcome.get("correct")) for r in rollouts]
    tags: dict[str, list[bool]] = defaultdict(list)
    for r, ok in zip(rollouts, correct, strict=True):
        for key, value in r.task.info.items():
            if isinstance(value, (str, bool, int)) or value is None:
                tags[f"{key}={value}"].append(ok)
    n = len(rollouts)
    scored = [r for r in rollouts if not r.failed]  # a failed rollout's reward is NaN: no score
    return EvalResult(
        name=name,
        n=n,
        accuracy=sum(correct) / max(1, n),
        mean_reward=sum(r.reward for r in scored) / max(1, len(scored)),
        by_tag={k: sum(v) / len(v) for k, v in sorted(tags.items()) if 0 < len(v) < n},
    )


def for_summary(rollout: Rollout) -> Rollout:
    """``rollout`` less the tensors and prompt that :func:`summarize` does not read: cheap to send.

    The assistant turns stay (text, for :func:`write_rollouts`).
    """
    t = rollout.task
    task = Task(t.id, t.split, [], {}, t.info)
    empty = {"token_ids": _EMPTY, "loss_mask": _EMPTY, "sample_logp": _EMPTY.float()}
    return replace(rollout, task=task, **empty)


def write_rollouts(path: Path, rollouts: list[Rollout]) -> None:
    """One JSON line per judged rollout: task id, ``correct``, reward, per-reward scores, stop reason, turns.

    What a held-out eval leaves behind so two evals on the same tasks can be compared task by task (paired
    intervals) and a wrong answer read. Written to a temporary name first: a crash leaves no half file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r in rollouts:
            row = {
                "task": r.task.id,
                "correct": bool(r.outcome.get("correct")),
                "reward": None if r.failed else r.reward,
                "scores": r.scores,
                "stop_reason": r.stop_reason,
                "turns": r.turns,
            }
            f.write(json.dumps(row, default=str) + "\n")
    tmp.replace(path)


def baseline_results(env: Env, rubric: Rubric, tasks: list[Task]) -> list[EvalResult]:
    """Every trivial policy the env ships, scored on ``tasks``."""
    return [evaluate_policy(env, rubric, tasks, policy, name) for name, policy in env.baselines().items()]


def best_of(results: list[EvalResult], prefix: str) -> EvalResult | None:
    """The most accurate result whose name starts with ``prefix``."""
    pool = [r for r in results if r.name.startswith(prefix)]
    return max(pool, key=lambda r: r.accuracy) if pool else None


def format_table(results: list[EvalResult], tags: bool = True) -> str:
    """A plain-text table: one row per policy, accuracy, mean reward, then per-tag accuracies."""
    tag_names = sorted({k for r in results for k in r.by_tag}) if tags else []
    head = ["policy", "n", "accuracy", "reward", *tag_names]
    rows = [
        [r.name, str(r.n), f"{100 * r.accuracy:.1f}%", f"{r.mean_reward:+.3f}"]
        + [f"{100 * r.by_tag[t]:.1f}%" if t in r.by_tag else "" for t in tag_names]
        for r in results
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def write_report(path: Path, results: list[EvalResult], meta: dict[str, Any]) -> None:
    """Write results as JSON (``meta`` says env, split, n, model)."""
    path.write_text(json.dumps({**meta, "results": [asdict(r) for r in results]}, indent=2))
