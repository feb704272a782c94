"""Stage 0, config: a recipe (YAML file + ``key=value`` overrides) becomes a typed, validated :class:`Config`.

    recipe.yaml ──safe_load──▶ dict ──overrides──▶ dict ──build──▶ Config ──validate()──▶ ok | ConfigError

Nothing stops at the first problem: malformed YAML, unknown keys, wrong types, out-of-range values,
cross-field conflicts and (given a resolver such as :func:`rltk.plugins.resolve`) unknown env or reward
names are all collected into one :class:`ConfigError`, one line each: ``field.path: bad value (why) → fix``.
Each field's range sits next to it (``_f(default, "> 0")``); the schema is documented in docs/contracts.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from rltk.typedyaml import apply_override, build, check, one_of, problem, read_yaml

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
    format: Literal["auto", "text", "messages"] = _f(
        "auto", "", "text: strings; messages: TRL's conversational lists; auto: as declared, else text"
    )


@dataclass
class RolloutConfig:
    """Sampling: P prompts per step, G completions per prompt, generation limits."""

    prompts_per_step: int = _f(4, "> 0")
    group_size: int = _f(8, ">= 1", "rollouts per task; group-relative estimators need >= 2")
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
    backend: Literal["hf", "vllm"] = _f(
        "hf", "", "the sampler: transformers on the policy, or vLLM in its own venv (scripts/setup_vllm.sh)"
    )
    vllm_python: str = _f("", "", "the vLLM venv's python; empty = $RLTK_VLLM_PYTHON or .venv-vllm")
    vllm_kv_cache_gib: float = _f(
        2.0, "> 0", "the vLLM sampler's KV cache, GiB (vLLM's kv_cache_memory_bytes)"
    )


@dataclass(frozen=True)
class AlgorithmView:
    """The algorithm with its presets applied (no ``None`` left); what advantage and loss read."""

    name: str
    estimator: str
    scale_std: bool
    dynamic_sampling: bool
    epsilon_low: float
    epsilon_high: float
    aggregation: str
    ratio: str
    beta: float
    kl_in_reward: bool
    entropy_coef: float
    epochs: int
    minibatches: int
    target_kl: float
    tis_cap: float
    gamma: float
    lam: float
    whiten: bool
    critic: bool
    vf_coef: float
    value_clip: float
    critic_lr: float
    critic_warmup_steps: int
    shared_prompt: str
    balance_answers: bool


PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {"estimator": "grpo", "scale_std": True, "dynamic_sampling": False, "aggregation": "seq_mean"},
    "dr_grpo": {"estimator": "grpo", "scale_std": False, "dynamic_sampling": False, "aggregation": "dr_grpo"},
    "dapo": {
        "estimator": "grpo",
        "scale_std": True,
        "dynamic_sampling": True,
        "aggregation": "token_mean",
        "epsilon_high": 0.28,
    },
    "maxrl": {"estimator": "maxrl", "scale_std": False, "dynamic_sampling": False, "aggregation": "seq_mean"},
    "rloo": {
        "estimator": "rloo",
        "scale_std": False,
        "dynamic_sampling": False,
        "aggregation": "seq_mean",
        "ratio": "sequence",
    },
    "ppo": {
        "estimator": "gae",
        "scale_std": False,
        "dynamic_sampling": False,
        "aggregation": "token_mean",
        "critic": True,
        "whiten": True,
        "kl_in_reward": True,
        "epochs": 2,  # λ = 1 (BASE), as verl: at 0.95 a fresh critic's noise drove the early tokens (README)
    },
}
"""Per algorithm, the value of each field left ``null``; a field a preset leaves out takes :data:`BASE`."""

BASE: dict[str, Any] = {
    "epsilon_high": None,  # = epsilon_low
    "ratio": "token",
    "critic": False,
    "whiten": False,
    "kl_in_reward": False,
    "epochs": 1,
    "lam": 1.0,
}
"""What a ``null`` field takes when the algorithm's preset does not set it."""


@dataclass
class AlgorithmConfig:
    """An advantage estimator plus a loss; ``null`` fields take the preset of ``name`` (:data:`PRESETS`)."""

    RENAMED: ClassVar[dict[str, str]] = {"updates_per_batch": "epochs"}  # old name → new (older run dirs)
    name: Literal["grpo", "dr_grpo", "dapo", "maxrl", "rloo", "ppo"] = "grpo"
    estimator: str | None = _f(None, "", "advantage estimator (advantage.ESTIMATORS); null takes the preset")
    scale_std: bool | None = None
    dynamic_sampling: bool | None = None
    epsilon_low: float = _f(0.2, ">= 0")
    epsilon_high: float | None = _f(None, ">= 0", "null takes the preset")
    aggregation: Literal["token_mean", "seq_mean", "dr_grpo"] | None = None
    ratio: Literal["token", "sequence"] | None = _f(
        None, "", "importance ratio per token, or per rollout (exp of the summed log-ratio, as TRL's RLOO)"
    )
    beta: float = _f(0.0, ">= 0", "KL coefficient, 0 = no KL")
    kl_in_reward: bool | None = _f(None, "", "KL as a per-token penalty in the reward (ppo), not a loss term")
    entropy_coef: float = _f(0.0, ">= 0", "entropy bonus coefficient, 0 = off")
    epochs: int | None = _f(None, ">= 1", "passes over each step's rollouts (ppo 2, others 1)")
    minibatches: int = _f(
        1, ">= 1", "optimizer steps per epoch (whole groups unless optim.rollouts_per_micro_batch splits)"
    )
    target_kl: float = _f(0.0, ">= 0", "stop a step's epochs once the approximate KL passes it; 0 = off")
    tis_cap: float = _f(0.0, ">= 0", "truncated importance sampling: min(π_old / π_sampler, cap); 0 = off")
    gamma: float = _f(1.0, "[0, 1]", "discount (estimator gae)")
    lam: float | None = _f(None, "[0, 1]", "GAE lambda (estimator gae)")
    whiten: bool | None = _f(None, "", "normalise token advantages over the step (ppo)")
    critic: bool | None = _f(None, "", "a value head on the policy's trunk (ppo)")
    vf_coef: float = _f(0.1, ">= 0", "value loss coefficient; 0 = a frozen critic")
    value_clip: float = _f(0.2, "> 0", "clip of the value update around the old values")
    critic_lr: float = _f(0.0, ">= 0", "the critic's learning rate; 0 = optim.lr")
    critic_warmup_steps: int = _f(0, ">= 0", "first RL steps that train the critic only")
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
        >>> AlgorithmConfig(name="rloo").resolved().ratio, AlgorithmConfig().resolved().ratio
        ('sequence', 'token')
        """
        if self.name not in PRESETS:
            raise ConfigError([problem("algorithm.name", self.name, "unknown algorithm", one_of(PRESETS))])
        preset = {**BASE, **PRESETS[self.name]}
        values = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in preset.items()}
        if values["epsilon_high"] is None:
            values["epsilon_high"] = self.epsilon_low
        rest = {f.name: getattr(self, f.name) for f in fields(AlgorithmView) if f.name not in values}
        return AlgorithmView(**values, **rest)


@dataclass
class OptimConfig:
    """AdamW, learning-rate schedule, clipping and micro-batching (whole groups, or rollouts of one group)."""

    lr: float = _f(1.0e-5, "> 0")
    weight_decay: float = _f(0.0, ">= 0")
    betas: tuple[float, float] = _f((0.9, 0.999), "[0, 1)")
    warmup_steps: int = _f(0, ">= 0")
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float = _f(1.0, "> 0")
    groups_per_micro_batch: int = _f(4, "> 0")
    rollouts_per_micro_batch: int = _f(
        0,
        ">= 0",
        "0 = whole groups; else the update's micro-batches hold this many rollouts of one group (a divisor "
        "of group_size): less activation memory for long episodes",
    )


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
    verified_only: bool = _f(
        False,
        note="keep only the demonstrations whose episode the env verifies correct (logs filtered by an "
        "audit: the outcome-filtered SFT row that sees the verifier RL sees)",
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
            >>> Config(rollout=RolloutConfig(group_size=0, top_p=0.0)).validate()
            Traceback (most recent call last):
            ...
            rltk.config.ConfigError: invalid config: 2 problems
              - rollout.group_size: 0 (must be >= 1; rollouts per task; group-relative estimators need >= 2) → e.g. rollout.group_size=8
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

        from rltk.config_checks import cross_field_problems, plugin_problems  # they read this schema

        problems += cross_field_problems(self, ok)
        if resolve is not None and ok("env", "rewards"):
            problems += plugin_problems(self, resolve, bad)
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
