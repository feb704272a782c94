"""The config's cross-field and plugin checks: what no single field's type and bounds can say.

Each returns problem lines (``path: value (why) → fix``) and never raises, so that
:meth:`rltk.config.Config.validate` lists every problem at once. ``ok(*paths)`` says whether those fields
passed their own checks (a cross-field check on a bad field would only repeat it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from rltk.config import TRAIN_TIME_FILE, AlgorithmConfig, Config, Resolver
from rltk.typedyaml import join_path, one_of, problem

Ok = Callable[..., bool]


def cross_field_problems(cfg: Config, ok: Ok) -> list[str]:
    """Every cross-field check of ``cfg``."""
    problems: list[str] = []
    pair = ("algorithm.shared_prompt", "model.gradient_checkpointing")
    if ok(*pair) and cfg.algorithm.shared_prompt == "kv" and cfg.model.gradient_checkpointing:
        why = "transformers drops the KV cache under model.gradient_checkpointing=true"
        fix = "use algorithm.shared_prompt=packed, or model.gradient_checkpointing=false"
        problems.append(problem("algorithm.shared_prompt", "kv", why, fix))
    if ok("rollout.min_new_tokens", "rollout.max_new_tokens"):
        lo, hi = cfg.rollout.min_new_tokens, cfg.rollout.max_new_tokens
        if lo > hi:
            why = f"greater than rollout.max_new_tokens={hi}"
            problems.append(problem("rollout.min_new_tokens", lo, why, f"set it <= {hi}"))
    rows = ok("optim.rollouts_per_micro_batch") and cfg.optim.rollouts_per_micro_batch
    g = ok("rollout.group_size") and cfg.rollout.group_size
    if rows and g and g % rows:
        why = f"it must divide rollout.group_size={g} (a micro-batch holds rollouts of one group)"
        fix = "use one of " + ", ".join(str(d) for d in range(1, g + 1) if g % d == 0) + ", or 0"
        problems.append(problem("optim.rollouts_per_micro_batch", rows, why, fix))
    if ok("warmstart.enabled", "warmstart.steps") and cfg.warmstart.enabled and not cfg.warmstart.steps:
        why = "warmstart.enabled is true but it has no steps"
        problems.append(problem("warmstart.steps", 0, why, "set warmstart.steps > 0 or enabled=false"))
    if ok("rollout.backend", "rollout.vllm_python") and cfg.rollout.backend == "vllm":
        from rltk.vllm_sampler import resolve_python

        try:
            resolve_python(cfg.rollout.vllm_python or None)
        except FileNotFoundError as exc:
            fix = "run `bash scripts/setup_vllm.sh` (or set rollout.vllm_python), or use rollout.backend=hf"
            problems.append(problem("rollout.backend", "vllm", str(exc).split(". ")[0], fix))
    problems += algorithm_problems(cfg, ok)
    problems += report_problems(cfg, ok)
    return problems


def algorithm_problems(cfg: Config, ok: Ok) -> list[str]:
    """Cross-field checks of ``algorithm``: a registered estimator that gets what it needs."""
    from rltk.advantage import ESTIMATORS, GROUPED, estimator_for  # filled when rltk.advantage is imported

    if not ok(*(f"algorithm.{f.name}" for f in fields(AlgorithmConfig))):
        return []
    algo, problems = cfg.algorithm.resolved(), []
    try:
        estimator_for(algo.estimator)
    except Exception as exc:  # reported with every other problem, not raised
        why = "unknown estimator" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        fix = one_of(sorted(ESTIMATORS), algo.estimator) + "; or pkg.module:function"
        problems.append(problem("algorithm.estimator", algo.estimator, why, fix))
    if algo.estimator == "gae" and not algo.critic:
        why = "gae needs a critic's values"
        fix = "set algorithm.critic=true (as ppo does)"
        problems.append(problem("algorithm.estimator", "gae", why, fix))
    elif algo.estimator in GROUPED and ok("rollout.group_size") and cfg.rollout.group_size < 2:
        why = f"estimator {algo.estimator!r} compares the rollouts of a task"
        fix = "use rollout.group_size >= 2, or algorithm.name=ppo"
        problems.append(problem("rollout.group_size", cfg.rollout.group_size, why, fix))
    if algo.balance_answers and algo.estimator == "gae":
        why = "balancing acts on sequence-level advantages"
        problems.append(problem("algorithm.balance_answers", True, why, "set it false"))
    if ok("rollout.prompts_per_step") and algo.minibatches > cfg.rollout.prompts_per_step:
        why = f"more than rollout.prompts_per_step={cfg.rollout.prompts_per_step} (whole groups each)"
        fix = f"set it <= {cfg.rollout.prompts_per_step}"
        problems.append(problem("algorithm.minibatches", algo.minibatches, why, fix))
    return problems


def report_problems(cfg: Config, ok: Ok) -> list[str]:
    """Cross-field checks of eval.report and of the SFT-only comparison (warmstart.equal_time_as)."""
    problems = []
    rep, ws = cfg.eval.report, cfg.warmstart
    if ok("eval.report.bon", "eval.report.samples") and rep.bon > rep.samples:
        why = f"best-of-N picks from the samples, and eval.report.samples={rep.samples}"
        problems.append(problem("eval.report.bon", rep.bon, why, f"set it <= {rep.samples}"))
    if ok("warmstart.equal_time_as", "warmstart.enabled") and ws.equal_time_as:
        if not ws.enabled:
            why = "an SFT-only comparison is a warm start"
            problems.append(problem("warmstart.enabled", False, why, "set warmstart.enabled=true"))
        if not Path(ws.equal_time_as, TRAIN_TIME_FILE).is_file():
            why = f"{ws.equal_time_as}/{TRAIN_TIME_FILE} is missing (a finished rltk train run writes it)"
            problems.append(
                problem("warmstart.equal_time_as", ws.equal_time_as, why, "name a finished run dir")
            )
    return problems


def plugin_problems(cfg: Config, resolve: Resolver, bad: set[str]) -> list[str]:
    """Resolve env and reward names; check env options and reward signatures against the recipe."""
    problems: list[str] = []
    env = None
    path, kw_path, name, options = "env.name", "env.options", cfg.env.name, cfg.env.options
    if path not in bad and kw_path not in bad:
        try:
            env_cls = resolve("env", name)
        except Exception as exc:  # reported, not raised: the point is every problem at once
            why = getattr(exc, "why", None) or f"{type(exc).__name__}: {exc}"
            problems.append(problem(path, name, why, getattr(exc, "fix", None) or "check the name"))
        else:
            if not cfg.rewards and not getattr(env_cls, "default_rewards", None):
                why = f"env '{name}' declares no default_rewards"
                problems.append(problem("rewards", [], why, "list rewards: [{name: ..., weight: 1.0}]"))
            unknown = env_kwarg_problems(env_cls, name, options)
            problems += unknown
            if not unknown:
                more, env = env_option_problems(env_cls, name, options)
                problems += more
    return problems + reward_problems(cfg, resolve, bad, env)


def env_kwarg_problems(env_cls: Any, name: str, options: dict[str, Any]) -> list[str]:
    """Options the env's constructor does not name (where it takes no ``**options``)."""
    try:
        params = list(inspect.signature(env_cls).parameters.values())
    except (TypeError, ValueError):  # no readable signature: nothing to check the names against
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    why = f"not a parameter of env '{name}'"
    fix = (lambda key: one_of(accepted, key)) if accepted else (lambda key: "remove it: it takes none")
    return [
        problem(join_path("env.options", k), v, why, fix(k)) for k, v in options.items() if k not in accepted
    ]


def reward_problems(cfg: Config, resolve: Resolver, bad: set[str], env: Any) -> list[str]:
    """Every ``rewards.N``: its name resolves and its signature takes what rltk passes it with its params.

    With the env built (``env``), params default to its ``default_reward_params`` and a batch (TRL) reward's
    required columns are checked against the reference fields of one of its train tasks. A recipe with no
    ``rewards:`` is checked on the env's ``default_rewards`` (what the run would score with).
    """
    from rltk.reward_contract import contract_problems

    problems: list[str] = []
    env_params = (getattr(env, "default_reward_params", None) or {}) if env is not None else {}
    columns = _reference_fields(env)
    for path, name, own, fmt in _rubric_entries(cfg, bad, env):
        try:
            fn = resolve("reward", name)
        except Exception as exc:  # reported, not raised
            why = getattr(exc, "why", None) or f"{type(exc).__name__}: {exc}"
            fix = getattr(exc, "fix", None) or "check the name"
            problems.append(problem(f"{path}.name" if own is not None else path, name, why, fix))
            continue
        own = own or {}
        for key, why, fix in contract_problems(fn, {**env_params.get(name, {}), **own}, fmt, columns):
            where = f"{path}.params.{key}" if key in own else path
            fix = fix.replace("rewards.N.", f"{path}.")
            why = why.replace("the reward", f"reward '{name}'") if "the reward" in why else f"{name}: {why}"
            problems.append(problem(where, own.get(key, name), why, fix))
    return problems


def _rubric_entries(
    cfg: Config, bad: set[str], env: Any
) -> list[tuple[str, str, dict[str, Any] | None, str]]:
    """``(path, name, params, format)`` of each reward the run would score with, where its config is sound.

    The recipe's ``rewards.N`` (params: its own), or without any, the env's ``default_rewards`` (path
    ``env.default_rewards.NAME``, params ``None``: the env's defaults only).
    """
    if cfg.rewards:
        fields = ("name", "params", "format")
        return [
            (f"rewards.{i}", r.name, r.params, r.format)
            for i, r in enumerate(cfg.rewards)
            if not any(f"rewards.{i}.{f}" in bad for f in fields)
        ]
    defaults = getattr(env, "default_rewards", None) if env is not None else None
    if not isinstance(defaults, dict):  # none, or a contract error make_env reports with its fix
        return []
    return [(f"env.default_rewards.{name}", name, None, "auto") for name in defaults]


def _reference_fields(env: Any) -> set[str] | None:
    """The reference fields of the env's first train task (``None``: no env, or it cannot make one)."""
    if env is None:
        return None
    try:
        tasks = env.tasks("train", 1)
    except Exception:  # the env's own problem; the run would show it
        return None
    return set(tasks[0].reference) if tasks else None


def env_option_problems(env_cls: Any, name: str, options: dict[str, Any]) -> tuple[list[str], Any]:
    """Build the env once, so that what it rejects is reported with every other problem, not at step 0.

    That catches bad option values (``difficulty: hard`` where it takes basic/varied/combined) and unknown
    names an env's ``**options`` hides from the signature check.

    Returns:
        The problems, and the env (``None`` when it was rejected).

    """
    try:
        return [], env_cls(**options)
    except (TypeError, ValueError) as exc:
        why = f"env '{name}' rejected them: {exc}"
        return [problem("env.options", options, why, "use options and values the env accepts")], None
