"""Stage 0, config: a recipe (YAML file + ``key=value`` overrides) becomes a typed, validated :class:`Config`.

    recipe.yaml ──safe_load──▶ dict ──overrides──▶ dict ──build──▶ Config ──validate()──▶ ok | ConfigError

Nothing stops at the first problem: malformed YAML, unknown keys, wrong types, out-of-range values,
cross-field conflicts and (given a resolver such as :func:`rltk.plugins.resolve`) unknown env or reward
names are all collected into one :class:`ConfigError`, one line each: ``field.path: bad value (why) → fix``.
Each field's range sits next to it (``_f(default, "> 0")``); the schema is documented in docs/contracts.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

Resolver = Callable[[str, str], Any]
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
    reward_timeout_s: float = _f(10.0, "> 0")


@dataclass(frozen=True)
class AlgorithmView:
    """The algorithm with its presets applied (no ``None`` left); what advantage and loss read."""

    name: str
    scale_std: bool
    dynamic_sampling: bool
    epsilon_low: float
    epsilon_high: float
    aggregation: str
    beta: float
    updates_per_batch: int
    shared_prompt: str


PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {"scale_std": True, "dynamic_sampling": False, "aggregation": "seq_mean", "epsilon_high": None},
    "dr_grpo": {
        "scale_std": False,
        "dynamic_sampling": False,
        "aggregation": "dr_grpo",
        "epsilon_high": None,
    },
    "dapo": {"scale_std": True, "dynamic_sampling": True, "aggregation": "token_mean", "epsilon_high": 0.28},
}
"""Per algorithm, the value of each field left ``null`` (``epsilon_high: None`` means ``= epsilon_low``)."""


@dataclass
class AlgorithmConfig:
    """GRPO-family algorithm; ``null`` fields take the preset of ``name`` (see :data:`PRESETS`)."""

    name: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    scale_std: bool | None = None
    dynamic_sampling: bool | None = None
    epsilon_low: float = _f(0.2, ">= 0")
    epsilon_high: float | None = _f(None, ">= 0", "null takes the preset")
    aggregation: Literal["token_mean", "seq_mean", "dr_grpo"] | None = None
    beta: float = _f(0.0, ">= 0", "KL coefficient, 0 = no KL")
    updates_per_batch: int = _f(1, ">= 1")
    shared_prompt: Literal["kv", "packed", "off"] = "kv"

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
            raise ConfigError([_problem("algorithm.name", self.name, "unknown algorithm", _one_of(PRESETS))])
        mine = {k: getattr(self, k) for k in PRESETS[self.name]}
        values = {k: PRESETS[self.name][k] if v is None else v for k, v in mine.items()}
        if values["epsilon_high"] is None:
            values["epsilon_high"] = self.epsilon_low
        rest = ("name", "epsilon_low", "beta", "updates_per_batch", "shared_prompt")
        return AlgorithmView(**values, **{k: getattr(self, k) for k in rest})


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
    """Optional SFT on the env's oracle demonstrations before RL."""

    enabled: bool = False
    steps: int = _f(0, ">= 0")
    lr: float = _f(1.0e-4, "> 0")
    batch_size: int = _f(8, "> 0")


@dataclass
class EvalConfig:
    """Evaluation split, size, budget and cadence."""

    split: Literal["train", "eval", "test"] = "eval"
    n: int = _f(400, "> 0")
    max_new_tokens: int = _f(16, "> 0")
    every: int = _f(0, ">= 0", "0 = only at the end")


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
        _check(self, Config, "", {}, problems, bad)

        def ok(*paths: str) -> bool:
            return not any(p == b or p.startswith(b + ".") or not b for p in paths for b in bad)

        pair = ("algorithm.shared_prompt", "model.gradient_checkpointing")
        if ok(*pair) and self.algorithm.shared_prompt == "kv" and self.model.gradient_checkpointing:
            why = "transformers drops past_key_values under model.gradient_checkpointing=true"
            fix = "use algorithm.shared_prompt=packed, or model.gradient_checkpointing=false"
            problems.append(_problem("algorithm.shared_prompt", "kv", why, fix))
        if ok("rollout.min_new_tokens", "rollout.max_new_tokens"):
            lo, hi = self.rollout.min_new_tokens, self.rollout.max_new_tokens
            if lo > hi:
                why = f"greater than rollout.max_new_tokens={hi}"
                problems.append(_problem("rollout.min_new_tokens", lo, why, f"set it <= {hi}"))
        if ok("warmstart.enabled", "warmstart.steps") and self.warmstart.enabled and not self.warmstart.steps:
            why = "warmstart.enabled is true but it has no steps"
            problems.append(_problem("warmstart.steps", 0, why, "set warmstart.steps > 0 or enabled=false"))
        if resolve is not None and ok("env", "rewards"):
            problems += _check_plugins(self, resolve, bad)
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
    raw = {} if path is None else _read_yaml(Path(path), problems)
    for item in overrides:
        _apply_override(raw, item, problems)
    cfg = _build(Config, raw, "", problems)
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


# ----------------------------------------------------------------------------------------- helpers
def _show(value: Any) -> str:
    """Spell a bad value for a message: ``true``, ``null``, ``'text'``, ``[1, 2]``."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _cli(value: Any) -> str:
    """Spell a value as an override would: ``grpo``, ``1.0e-05``, ``[jsonl]``."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("...\n").strip()


def _problem(path: str, value: Any, why: str, fix: str) -> str:
    return f"{path}: {_show(value)} ({why}) → {fix}"


def _one_of(choices: Any, value: Any = None) -> str:
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), names, n=1) if value is not None else []
    return (f"did you mean '{close[0]}'? " if close else "") + f"valid: {', '.join(names)}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _in_bounds(value: Any, bounds: str) -> bool:
    """Whether ``value`` (or each item of a tuple) is within ``bounds``.

    >>> _in_bounds(1.0, "(0, 1]"), _in_bounds(0, "> 0"), _in_bounds((0.9, 1.0), "[0, 1)")
    (True, False, False)
    """
    if isinstance(value, tuple | list):
        return all(_in_bounds(v, bounds) for v in value)
    if bounds == "nonempty" or value is None:
        return bool(value) or value is None
    if bounds[0] in "([":
        lo, hi = (float(x) for x in bounds[1:-1].split(","))
        return (lo < value if bounds[0] == "(" else lo <= value) and (
            value < hi if bounds[-1] == ")" else value <= hi
        )
    op, num = bounds.split()
    return value > float(num) if op == ">" else value >= float(num)


# ----------------------------------------------------------------------------------------- build + check
_FLOAT_STR = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_TYPE_NAMES = {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string"}


def _optional(hint: Any) -> tuple[Any, bool]:
    """Split ``X | None`` into ``(X, True)``; any other hint gives ``(hint, False)``."""
    if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
        return next(a for a in get_args(hint) if a is not type(None)), True
    return hint, False


def _convert(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    """Coerce losslessly from YAML (numbers to float/str, lists to tuples); keep anything else for _check."""
    hint, _ = _optional(hint)
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, problems)
    if origin in (list, tuple) and isinstance(value, list | tuple):
        items = [
            _convert(v, args[min(i, len(args) - 1)], _join(path, i), problems) for i, v in enumerate(value)
        ]
        return tuple(items) if origin is tuple else items
    if hint is float and (type(value) is int or (isinstance(value, str) and _FLOAT_STR.match(value))):
        return float(value)
    return str(value) if hint is str and type(value) in (int, float) else value


def _build(cls: Any, data: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping (``None``: an empty section), reporting unknown keys.

    Anything else is returned as is, for :func:`_check` to report.
    """
    if not isinstance(data, Mapping):
        return cls() if data is None else data
    hints, names = get_type_hints(cls), [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key in hints:
            kwargs[key] = _convert(value, hints[key], _join(path, key), problems)
            continue
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"{_join(path, key)}: unknown key{hint} (valid keys: {', '.join(names)})")
    return cls(**kwargs)


def _check(
    value: Any, hint: Any, path: str, meta: Mapping[str, Any], problems: list[str], bad: set[str]
) -> None:
    """Report ``value`` if not a ``hint`` or out of ``meta["bounds"]``; recurse; add bad paths to ``bad``."""
    hint, nullable = _optional(hint)
    origin, args = get_origin(hint), get_args(hint)
    why = fix = ""
    if value is None and nullable:
        pass
    elif dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            why, fix = "expected a mapping", f"write {path or 'the recipe'} as 'key: value' lines"
        else:
            defaults, hints = hint(), get_type_hints(hint)
            for f in fields(hint):
                sub_meta = {**f.metadata, "default": getattr(defaults, f.name)}
                _check(getattr(value, f.name), hints[f.name], _join(path, f.name), sub_meta, problems, bad)
    elif origin is Literal:
        if value not in args or isinstance(value, bool):
            why, fix = "not a valid choice", _one_of(args, value)
    elif origin in (list, tuple):
        if not isinstance(value, list | tuple) or (origin is tuple and len(value) != len(args)):
            why = f"expected a list of {len(args)}" if origin is tuple else "expected a list"
        else:
            n = len(bad)
            for i, item in enumerate(value):
                _check(item, args[min(i, len(args) - 1)], _join(path, i), {}, problems, bad)
            if len(bad) > n:  # the items are reported; the list is bad too, so its bounds are not checked
                bad.add(path)
                return
    elif origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            why = "expected a mapping with string keys"
    elif hint in _TYPE_NAMES:
        good = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if hint is float:
            good = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        why = "" if good else f"expected {_TYPE_NAMES[hint]}, got {type(value).__name__}"
    bounds = meta.get("bounds")
    if not why and bounds and not _in_bounds(value, bounds):
        shown = "not empty" if bounds == "nonempty" else f"in {bounds}" if bounds[0] in "([" else bounds
        why = f"must be {shown}" + (f"; {meta['note']}" if meta.get("note") else "")
    if why:
        default = meta.get("default")
        if not fix:
            fix = f"e.g. {path}={_cli(default)}" if default not in (None, "") else "see docs/contracts.md"
        bad.add(path)
        problems.append(_problem(path, value, why, fix))


# ----------------------------------------------------------------------------------------- sources
class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for i, key in enumerate(keys):
            if isinstance(key, Hashable) and key in keys[:i]:
                mark = node.value[i][0].start_mark
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    """Read the recipe's top-level mapping; a missing file, bad YAML or a non-mapping become problems."""
    if not path.is_file():
        siblings = sorted(p.name for p in path.parent.glob("*.y*ml")) if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, siblings, n=1)
        fix = (
            f"did you mean {path.parent / close[0]}?" if close else f"found: {', '.join(siblings) or 'none'}"
        )
        problems.append(f"{path}: recipe file not found → check the path; {fix}")
        return {}
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "the file"
        why = getattr(exc, "problem", None) or str(exc)
        problems.append(f"{where}: not valid YAML ({why}) → fix the syntax at {at}")
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read the recipe ({exc}) → check the file's permissions and encoding")
        return {}
    if data is None or isinstance(data, dict):
        return data or {}
    why = f"the top level is a {type(data).__name__}; a recipe must be a mapping of sections"
    problems.append(f"{path}: {_show(data)[:60]} ({why}) → write sections such as 'run:' and 'rollout:'")
    return {}


def _apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> None:
    """Set ``a.b.c=value`` in ``raw``, creating mappings (or lists, before numeric keys) on the way."""
    key, eq, text = item.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        why = "missing '='" if not eq else "empty key"
        problems.append(f"override {item!r}: {why} → write key=value, e.g. run.steps=3 or rewards.0.weight=2")
        return
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        child: Any = value if last else ([] if parts[i + 1].isdigit() else {})
        if isinstance(node, list) and part.isdigit() and int(part) <= len(node):
            if int(part) == len(node):
                node.append(child)
            elif last:
                node[int(part)] = child
            node = node[int(part)]
        elif isinstance(node, dict):
            if last or not isinstance(node.get(part), dict | list):
                node[part] = child
            node = node[part]
        else:
            where = ".".join(parts[:i])
            kind = f"a list of {len(node)}" if isinstance(node, list) else f"a {type(node).__name__}"
            why = f"cannot set '{part}' in {where}, which is {kind}"
            problems.append(f"override {item!r}: {where}.{part} ({why}) → check the key and index")
            return


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
            problems.append(_problem(path, name, why, getattr(exc, "fix", None) or "check the name"))
            continue
        if kind == "env" and not cfg.rewards and not getattr(plugin, "default_rewards", None):
            why = f"env '{name}' declares no default_rewards"
            problems.append(_problem("rewards", [], why, "list rewards: [{name: ..., weight: 1.0}]"))
        try:
            params = list(inspect.signature(plugin).parameters.values())[3 if kind == "reward" else 0 :]
        except (TypeError, ValueError):
            continue
        if any(p.kind is p.VAR_KEYWORD for p in params):
            continue
        accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key, value in kwargs.items():
            if key not in accepted:
                why = f"not a parameter of {kind} '{name}'"
                fix = _one_of(accepted, key) if accepted else "remove it: it takes none"
                problems.append(_problem(_join(kw_path, key), value, why, fix))
    return problems
