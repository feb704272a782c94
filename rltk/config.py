"""Stage 0, config: a recipe (YAML file + ``key=value`` overrides) becomes a typed, validated :class:`Config`.

    recipe.yaml ──safe_load──▶ dict ──overrides──▶ dict ──build──▶ Config ──validate()──▶ ok | ConfigError

Nothing stops at the first problem: malformed YAML, unknown keys, wrong types, out-of-range values,
cross-field conflicts and (given a resolver such as :func:`rltk.plugins.resolve`) unknown env or reward
names are all collected into one :class:`ConfigError`, one line each: ``field.path: bad value (why) → fix``.
Each field's range sits next to it (``_f(default, "> 0")``); the schema is documented in docs/contracts.md.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rltk.typedyaml import apply_override, build, check, join_path, one_of, problem, read_yaml

Resolver = Callable[[str, str], Any]
TRAIN_TIME_FILE = "train_time.json"  # a run's training wall time, for SFT-only runs of equal time
"""``(kind, name) -> plugin``, kind ``"env"`` or ``"reward"``; raises (e.g. ``PluginError``) when unknown."""


class ConfigError(ValueError):
    """Every problem of a config at once; ``problems`` holds one ``field.path: value (why) → fix`` each."""

    def __init__(self, problems: Sequence[str], source: str = "") -> None:
        self.problems = list(problems)
        n, where = len(self.problems), f" ({source})" if source else ""
        lines = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"invalid config{where}: {n} problem{'s' * (n != 1)}{lines}")


def _f(default: Any, bounds: str = "", note: str = "") -> Any:
    """Declare a field with its range (``"> 0"``, ``">= 2"``, ``"(0, 1]"``, ``"[0, 1)"``, ``"nonempty"``)."""
    return field(default=default, metadata={"bounds": bounds, "note": note})


@dataclass
class RunConfig:
    """Where a run writes, how long it lasts, how it logs and resumes."""

    output_dir: str = _f("runs/default", "nonempty")
    seed: int = 0
    steps: int = _f(100, "> 0")
    save_every: int = _f(50, ">= 0", "0 saves only at the end")
    keep_last_n: int = _f(2, ">= 1")
    log_every: int = _f(1, "> 0")
    report_to: list[Literal["jsonl", "wandb"]] = field(default_factory=lambda: ["jsonl"])
    threads: int = _f(0, ">= 0", "0 = torch default")
    resume: Literal["auto", "never"] = "auto"
    dist_timeout_s: float = _f(
        600.0, "> 0", "seconds a rank waits for the others in a collective, then fails naming the stalled one"
    )


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the policy; ``enabled: false`` trains every weight."""

    enabled: bool = True
    r: int = _f(16, ">= 1")
    alpha: float = _f(32.0, "> 0")
    dropout: float = _f(0.0, "[0, 1)")
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class ModelConfig:
    """The policy model: an embedded alias, a local directory or a hub id."""

    name: str = _f("smollm2-135m-instruct", "nonempty")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    mixed_precision: Literal["no", "bf16", "fp16"] = _f(
        "no",
        note="autocast compute dtype (accelerate); weights and optimizer state stay in dtype; "
        "benchmarks/precision.py measures what bf16 rounding does to the RL gradient",
    )
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class EnvConfig:
    """The environment: a registered name or ``pkg.module:ClassName``, and its constructor kwargs."""

    name: str = _f("policy_flagging", "nonempty")
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    """One reward of the rubric: a registered name or ``pkg.module:function``, its weight and kwargs."""

    name: str = _f("", "nonempty", "a registered reward name or pkg.module:function")
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    isolated: bool = _f(True, "", "false runs a cheap pure reward in the trainer (no hard kill on a hang)")


@dataclass
class RolloutConfig:
    """Sampling: P prompts per step, G completions per prompt, generation limits."""

    prompts_per_step: int = _f(4, "> 0")
    group_size: int = _f(8, ">= 2", "advantages compare completions within a group")
    max_new_tokens: int = _f(16, "> 0")
    min_new_tokens: int = _f(0, ">= 0")
    temperature: float = _f(1.0, "> 0")
    top_p: float = _f(1.0, "(0, 1]")
    top_k: int = _f(0, ">= 0", "0 = off")
    reward_timeout_s: float = _f(10.0, "> 0", "a reward call past it is killed and its rollout fails")
    reward_workers: int = _f(2, ">= 0", "processes running isolated rewards; 0 = all in the trainer")
    max_reward_error_rate: float = _f(0.05, "[0, 1)", "failed rollouts allowed over the window, per source")
    reward_error_window: int = _f(256, "> 0", "recent rollouts the failure rate is taken over")
    env_timeout_s: float = _f(30.0, "> 0", "an episode step or check past it fails its rollout")
    max_turns: int = _f(0, ">= 0", "assistant turns per rollout; 0 = the env's max_turns")
    max_rollout_tokens: int = _f(0, ">= 0", "model + env tokens per rollout; 0 = the model's context")


@dataclass(frozen=True)
class AlgorithmView:
    """The algorithm with its presets applied (no ``None`` left); what advantage and loss read."""

    name: str
    scale_std: bool
    dynamic_sampling: bool
    epsilon_low: float
    epsilon_high: float
    aggregation: str
    estimator: str
    beta: float
    entropy_coef: float
    updates_per_batch: int
    shared_prompt: str
    balance_answers: bool


PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {"scale_std": True, "dynamic_sampling": False, "aggregation": "seq_mean", "epsilon_high": None},
    "dr_grpo": {
        "scale_std": False,
        "dynamic_sampling": False,
        "aggregation": "dr_grpo",
        "epsilon_high": None,
    },
    "dapo": {"scale_std": True, "dynamic_sampling": True, "aggregation": "token_mean", "epsilon_high": 0.28},
    "maxrl": {"scale_std": False, "dynamic_sampling": False, "aggregation": "seq_mean", "epsilon_high": None},
}
"""Per algorithm, the value of each field left ``null`` (``epsilon_high: None`` means ``= epsilon_low``)."""


@dataclass
class AlgorithmConfig:
    """GRPO-family algorithm; ``null`` fields take the preset of ``name`` (see :data:`PRESETS`)."""

    name: Literal["grpo", "dr_grpo", "dapo", "maxrl"] = "grpo"
    scale_std: bool | None = None
    dynamic_sampling: bool | None = None
    epsilon_low: float = _f(0.2, ">= 0")
    epsilon_high: float | None = _f(None, ">= 0", "null takes the preset")
    aggregation: Literal["token_mean", "seq_mean", "dr_grpo"] | None = None
    beta: float = _f(0.0, ">= 0", "KL coefficient, 0 = no KL")
    entropy_coef: float = _f(0.0, ">= 0", "entropy bonus coefficient, 0 = off")
    updates_per_batch: int = _f(1, ">= 1")
    shared_prompt: Literal["kv", "packed", "off"] = "kv"
    balance_answers: bool = _f(False, "", "give every answer class the same net advantage (advantage.py)")

    def resolved(self) -> AlgorithmView:
        """Apply the preset of ``name`` to every field left ``None``; values set by the user always win.

        >>> AlgorithmConfig(name="dapo").resolved().epsilon_high
        0.28
        >>> AlgorithmConfig(name="dapo", epsilon_high=0.3, scale_std=False).resolved().scale_std
        False
        >>> AlgorithmConfig(name="dr_grpo", epsilon_low=0.1).resolved().epsilon_high
        0.1
        """
        if self.name not in PRESETS:
            raise ConfigError([problem("algorithm.name", self.name, "unknown algorithm", one_of(PRESETS))])
        mine = {k: getattr(self, k) for k in PRESETS[self.name]}
        values = {k: PRESETS[self.name][k] if v is None else v for k, v in mine.items()}
        if values["epsilon_high"] is None:
            values["epsilon_high"] = self.epsilon_low
        estimator = "max_likelihood" if self.name == "maxrl" else "group_relative"
        rest = (
            "name",
            "epsilon_low",
            "beta",
            "entropy_coef",
            "updates_per_batch",
            "shared_prompt",
            "balance_answers",
        )
        return AlgorithmView(**values, estimator=estimator, **{k: getattr(self, k) for k in rest})


@dataclass
class OptimConfig:
    """AdamW, learning-rate schedule, clipping and micro-batching (micro-batches hold whole groups)."""

    lr: float = _f(1.0e-5, "> 0")
    weight_decay: float = _f(0.0, ">= 0")
    betas: tuple[float, float] = _f((0.9, 0.999), "[0, 1)")
    warmup_steps: int = _f(0, ">= 0")
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = _f(1.0, "> 0")
    groups_per_micro_batch: int = _f(4, "> 0")


@dataclass
class WarmstartConfig:
    """Optional SFT on the env's oracle (or teacher) demonstrations before RL, or instead of it."""

    enabled: bool = False
    steps: int = _f(0, ">= 0")
    lr: float = _f(1.0e-4, "> 0")
    schedule: Literal["constant", "linear", "cosine"] = _f(
        "constant", note="lr schedule over warmstart.steps; linear/cosine end at 0"
    )
    batch_size: int = _f(8, "> 0")
    demos: Literal["oracle", "teacher"] = _f(
        "oracle",
        note="whose episodes: the oracle's, or the teacher's (a real workflow's logs: no oracle exists)",
    )
    equal_time_as: str = _f(
        "",
        note="SFT-only comparison: a finished run dir; SFT alone (no RL) for its training wall time "
        "(warm start + RL steps, from its train_time.json), with warmstart.steps an upper bound",
    )


@dataclass
class ReportConfig:
    """The proof report at the end of ``rltk train`` (``<output_dir>/report/``; see ``rltk eval --compare``).

    Rows: the base model, the model after the warm start, the final model, the env's teacher, oracle and best
    trivial policy, on the eval.n tasks of eval.split.
    """

    enabled: bool = False
    samples: int = _f(8, ">= 0", "samples per task for pass@k, pass^k and best-of-N; 0 = greedy only")
    sampled_tasks: int = _f(100, ">= 0", "sample the first N of the eval.n tasks; 0 = all of them")
    bon: int = _f(8, ">= 0", "best-of-N from the first N samples (<= samples); 0 = none")
    temperature: float = _f(1.0, "> 0", "sampling temperature of the sampled metrics")


@dataclass
class EvalConfig:
    """Evaluation split, size, budget and cadence."""

    split: Literal["train", "eval", "test"] = "eval"
    n: int = _f(400, "> 0")
    max_new_tokens: int = _f(0, ">= 0", "tokens per assistant turn; 0 = the env's Env.max_new_tokens")
    every: int = _f(
        0, ">= 0", "rltk train: eval before RL, every N steps and at the end; 0 = never (use rltk eval)"
    )
    report: ReportConfig = field(default_factory=ReportConfig)


@dataclass
class Config:
    """A whole recipe. ``rewards: []`` means the env's ``default_rewards``."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rewards: list[RewardConfig] = field(default_factory=list)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmstart: WarmstartConfig = field(default_factory=WarmstartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, resolve: Resolver | None = None) -> None:
        """Raise one :class:`ConfigError` listing every problem; with ``resolve``, env/reward names too.

        Args:
            resolve: ``(kind, name) -> plugin`` (e.g. :func:`rltk.plugins.resolve`). When given, ``env.name``
                and every ``rewards.N.name`` must resolve, and options/params must fit their signatures.

        Raises:
            ConfigError: If anything is wrong.

        Examples:
            >>> Config().validate()
            >>> Config(rollout=RolloutConfig(group_size=1, top_p=0.0)).validate()
            Traceback (most recent call last):
            ...
            rltk.config.ConfigError: invalid config: 2 problems
              - rollout.group_size: 1 (must be >= 2; advantages compare completions within a group) → e.g. rollout.group_size=8
              - rollout.top_p: 0.0 (must be in (0, 1]) → e.g. rollout.top_p=1.0

        """  # noqa: E501
        problems = self.problems(resolve)
        if problems:
            raise ConfigError(problems)

    def problems(self, resolve: Resolver | None = None) -> list[str]:
        """List what :meth:`validate` would raise with (empty when the config is valid)."""
        problems: list[str] = []
        bad: set[str] = set()
        check(self, Config, "", {}, problems, bad)

        def ok(*paths: str) -> bool:
            return not any(p == b or p.startswith(b + ".") or not b for p in paths for b in bad)

        pair = ("algorithm.shared_prompt", "model.gradient_checkpointing")
        if ok(*pair) and self.algorithm.shared_prompt == "kv" and self.model.gradient_checkpointing:
            why = "transformers drops the KV cache under model.gradient_checkpointing=true"
            fix = "use algorithm.shared_prompt=packed, or model.gradient_checkpointing=false"
            problems.append(problem("algorithm.shared_prompt", "kv", why, fix))
        if ok("rollout.min_new_tokens", "rollout.max_new_tokens"):
            lo, hi = self.rollout.min_new_tokens, self.rollout.max_new_tokens
            if lo > hi:
                why = f"greater than rollout.max_new_tokens={hi}"
                problems.append(problem("rollout.min_new_tokens", lo, why, f"set it <= {hi}"))
        if ok("warmstart.enabled", "warmstart.steps") and self.warmstart.enabled and not self.warmstart.steps:
            why = "warmstart.enabled is true but it has no steps"
            problems.append(problem("warmstart.steps", 0, why, "set warmstart.steps > 0 or enabled=false"))
        problems += self._report_problems(ok)
        if resolve is not None and ok("env", "rewards"):
            problems += _check_plugins(self, resolve, bad)
        return problems

    def _report_problems(self, ok: Callable[..., bool]) -> list[str]:
        """Cross-field checks of eval.report and of the SFT-only comparison (warmstart.equal_time_as)."""
        problems = []
        rep, ws = self.eval.report, self.warmstart
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


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), *, resolve: Resolver | None = None
) -> Config:
    """Read a recipe, apply ``key=value`` overrides, build and validate the :class:`Config`.

    Override values are parsed as YAML (``run.steps=3``, ``model.lora.enabled=false``,
    ``run.report_to=[jsonl,wandb]``); numeric keys index lists (``rewards.0.weight=2``; the index one past
    the end appends). Float fields also take strings such as ``1e-5`` (which YAML 1.1 reads as a string).

    Args:
        path: The recipe YAML, or ``None`` for the defaults.
        overrides: ``a.b=value`` strings, applied in order after the file.
        resolve: Optional ``(kind, name) -> plugin`` to check env/reward names in the same pass.

    Returns:
        The validated config.

    Raises:
        ConfigError: Listing every problem found (file, YAML, overrides, keys, types, values, names).

    Examples:
        >>> load_config(None, ["rollout.group_size=4", "algorithm.name=dapo"]).rollout.group_size
        4

    """
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    problems: list[str] = []
    raw = {} if path is None else read_yaml(Path(path), problems)
    for item in overrides:
        apply_override(raw, item, problems)
    cfg = build(Config, raw, "", problems)
    problems += cfg.problems(resolve)
    if problems:
        source = "defaults" if path is None else str(path)
        raise ConfigError(problems, source + (f" + overrides {overrides}" if overrides else ""))
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain dict of a config (lists, not tuples): ``yaml.safe_dump`` of it loads back equal.

    >>> config_to_dict(Config())["optim"]["betas"]
    [0.9, 0.999]
    """

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, list | tuple) else value

    return plain(dataclasses.asdict(cfg))


def _check_plugins(cfg: Config, resolve: Resolver, bad: set[str]) -> list[str]:
    """Resolve env and reward names; check env options and reward params against their signatures."""
    problems: list[str] = []
    wanted = [("env", "env.name", cfg.env.name, "env.options", cfg.env.options)]
    for i, r in enumerate(cfg.rewards):
        wanted.append(("reward", f"rewards.{i}.name", r.name, f"rewards.{i}.params", r.params))
    for kind, path, name, kw_path, kwargs in wanted:
        if path in bad or kw_path in bad:
            continue
        try:
            plugin = resolve(kind, name)
        except Exception as exc:  # reported, not raised: the point is every problem at once
            why = getattr(exc, "why", None) or f"{type(exc).__name__}: {exc}"
            problems.append(problem(path, name, why, getattr(exc, "fix", None) or "check the name"))
            continue
        if kind == "env" and not cfg.rewards and not getattr(plugin, "default_rewards", None):
            why = f"env '{name}' declares no default_rewards"
            problems.append(problem("rewards", [], why, "list rewards: [{name: ..., weight: 1.0}]"))
        before = len(problems)
        try:
            params = list(inspect.signature(plugin).parameters.values())[3 if kind == "reward" else 0 :]
        except (TypeError, ValueError):  # no readable signature: nothing to check the names against
            params = None
        if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params):
            accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            for key, value in kwargs.items():
                if key not in accepted:
                    why = f"not a parameter of {kind} '{name}'"
                    fix = one_of(accepted, key) if accepted else "remove it: it takes none"
                    problems.append(problem(join_path(kw_path, key), value, why, fix))
        if kind == "env" and len(problems) == before:
            problems += _check_env_options(plugin, name, kwargs)
    return problems


def _check_env_options(env_cls: Any, name: str, options: dict[str, Any]) -> list[str]:
    """Build the env once, so that what it rejects is reported with every other problem, not at step 0.

    That catches bad option values (``difficulty: hard`` where it takes basic/varied/combined) and unknown
    names an env's ``**options`` hides from the signature check.
    """
    try:
        env_cls(**options)
    except (TypeError, ValueError) as exc:
        why = f"env '{name}' rejected them: {exc}"
        return [problem("env.options", options, why, "use options and values the env accepts")]
    return []
