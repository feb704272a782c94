"""Config stage: YAML + overrides → typed Config; every problem reported at once, with its fix."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from rltk import plugins
from rltk.config import (
    AlgorithmConfig,
    Config,
    ConfigError,
    RewardConfig,
    RolloutConfig,
    config_to_dict,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path | None, overrides: list[str] = (), **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), **kw)
    assert str(info.value).count("\n  - ") == len(info.value.problems)
    return info.value.problems


def test_defaults_are_valid_and_match_the_contract() -> None:
    cfg = load_config(None, [])
    assert cfg == Config()
    assert (cfg.rollout.group_size, cfg.optim.betas, cfg.run.report_to) == (8, (0.9, 0.999), ["jsonl"])
    assert cfg.model.lora.target_modules[-1] == "down_proj" and cfg.rewards == []


def test_yaml_then_overrides_in_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        run: {steps: 10, output_dir: runs/x}
        rewards:
          - {name: flag_decision, weight: 1.0}
        optim: {lr: 1e-5}
        """,
    )
    cfg = load_config(
        path,
        [
            "run.steps=3",
            "model.lora.enabled=false",
            "run.report_to=[jsonl,wandb]",
            "rewards.0.weight=2",
            "rewards.1.name=flag_rule",  # one past the end appends
            "env.options.rules=[amount]",
            "optim.betas=[0.9,0.95]",
            "algorithm.epsilon_high=0.3",
            "model.mixed_precision=no",  # YAML 1.1 reads a bare `no` as false
        ],
    )
    assert cfg.run.steps == 3 and cfg.run.output_dir == "runs/x"
    assert cfg.model.lora.enabled is False
    assert cfg.run.report_to == ["jsonl", "wandb"]
    assert cfg.rewards == [RewardConfig("flag_decision", 2.0), RewardConfig("flag_rule")]
    assert cfg.env.options == {"rules": ["amount"]}
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads `1e-5` as a string
    assert cfg.algorithm.epsilon_high == 0.3
    assert cfg.model.mixed_precision == "no"


def test_unknown_keys_suggest_the_closest_name(tmp_path: Path) -> None:
    path = write(tmp_path, "rollouts: {}\nrollout:\n  group_sise: 4\n")
    first, second = problems_of(path)
    assert first.startswith("rollouts: unknown key; did you mean 'rollout'?")
    assert second.startswith("rollout.group_sise: unknown key; did you mean 'group_size'?")
    assert "valid keys: prompts_per_step, group_size" in second


def test_a_renamed_key_names_its_new_name(tmp_path: Path) -> None:
    # run dirs written before algorithm.updates_per_batch became algorithm.epochs
    path = write(tmp_path, "algorithm:\n  updates_per_batch: 2\n  RENAMED: {}\n")
    renamed, classvar = problems_of(path)
    new = "algorithm.epochs"
    assert renamed == f"algorithm.updates_per_batch: renamed {new} in this rltk → write {new}"
    assert classvar.startswith("algorithm.RENAMED: unknown key")  # a class attribute is not a field


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "rollout.group_size=eight",
            "rollout.group_size: 'eight' (expected an int, got str) → e.g. rollout.group_size=8",
        ),
        ("rollout.group_size=8.0", "rollout.group_size: 8.0 (expected an int, got float)"),
        ("model.lora.enabled=maybe", "model.lora.enabled: 'maybe' (expected a bool (true/false), got str)"),
        ("optim.lr=fast", "optim.lr: 'fast' (expected a number, got str) → e.g. optim.lr=1.0e-05"),
        ("rollout.temperature=.nan", "rollout.temperature: nan (expected a number, got float)"),
        ("rollout.group_size=0", "rollout.group_size: 0 (must be >= 1; rollouts per task"),
        ("rollout.group_size=1", "rollout.group_size: 1 (estimator 'grpo' compares the rollouts of a task)"),
        (
            "optim.rollouts_per_micro_batch=3",
            "optim.rollouts_per_micro_batch: 3 (it must divide rollout.group_size=8 (a micro-batch holds "
            "rollouts of one group)) → use one of 1, 2, 4, 8, or 0",
        ),
        ("rollout.temperature=0", "rollout.temperature: 0.0 (must be > 0) → e.g. rollout.temperature=1.0"),
        ("rollout.top_p=1.5", "rollout.top_p: 1.5 (must be in (0, 1]) → e.g. rollout.top_p=1.0"),
        ("rollout.top_p=0", "rollout.top_p: 0.0 (must be in (0, 1])"),
        (
            "rollout.min_new_tokens=32",
            "rollout.min_new_tokens: 32 (greater than rollout.max_new_tokens=16) → set",
        ),
        (
            "optim.betas=[0.9,1.0]",
            "optim.betas: [0.9, 1.0] (must be in [0, 1)) → e.g. optim.betas=[0.9, 0.999]",
        ),
        ("optim.betas=[0.9]", "optim.betas: [0.9] (expected a list of 2)"),
        ("model.name=''", "model.name: '' (must be not empty)"),
        (
            "algorithm.name=ppo2",
            "algorithm.name: 'ppo2' (not a valid choice) → did you mean 'ppo'? valid: grpo, dr_grpo, dapo",
        ),
        ("algorithm.name=dapoo", "algorithm.name: 'dapoo' (not a valid choice) → did you mean 'dapo'?"),
        (
            "run.report_to=[jsonl,wandbb]",
            "run.report_to.1: 'wandbb' (not a valid choice) → did you mean 'wandb'?",
        ),
        (
            "algorithm.aggregation=true",
            "algorithm.aggregation: true (not a valid choice) → valid: token_mean",
        ),
        ("rollout=5", "rollout: 5 (expected a mapping) → write rollout as 'key: value' lines"),
        ("rewards=[flag_decision]", "rewards.0: 'flag_decision' (expected a mapping)"),
        ("warmstart.enabled=true", "warmstart.steps: 0 (warmstart.enabled is true but it has no steps)"),
    ],
)
def test_each_bad_value_names_field_value_and_fix(override: str, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems_of(None, [override])), expected


def test_kv_shared_prompt_conflicts_with_gradient_checkpointing() -> None:
    (problem,) = problems_of(None, ["model.gradient_checkpointing=true"])
    assert problem.startswith("algorithm.shared_prompt: 'kv' (transformers drops the KV cache")
    assert "algorithm.shared_prompt=packed" in problem and "model.gradient_checkpointing=false" in problem
    cfg = load_config(None, ["model.gradient_checkpointing=true", "algorithm.shared_prompt=packed"])
    assert cfg.model.gradient_checkpointing


def test_malformed_yaml_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "run:\n  steps: 3\n  seed: [1, 2\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:4:1: not valid YAML (")
    assert "fix the syntax at line 4, column 1" in problem


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "run:\n  steps: 3\nrun:\n  steps: 4\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:3:1: not valid YAML (duplicate key 'run')")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    (problem,) = problems_of(write(tmp_path, "- run\n- model\n"))
    assert "top level is a list; a recipe must be a mapping" in problem and "'run:'" in problem
    assert load_config(write(tmp_path, "# nothing yet\n", "empty.yaml"), []) == Config()
    assert load_config(write(tmp_path, "run:\n#  steps: 3\n", "empty_section.yaml"), []) == Config()


def test_missing_recipe_suggests_a_sibling(tmp_path: Path) -> None:
    write(tmp_path, "run: {steps: 1}\n", "flagging_smoke.yaml")
    (problem,) = problems_of(tmp_path / "flaging_smoke.yaml")
    assert "flaging_smoke.yaml: recipe file not found" in problem
    assert f"did you mean {tmp_path / 'flagging_smoke.yaml'}?" in problem


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("run.steps", "override 'run.steps': missing '=' → write key=value"),
        ("=3", "override '=3': empty key"),
        ("run..steps=3", "override 'run..steps=3': empty key"),
        (
            "rewards.2.weight=1",
            "override 'rewards.2.weight=1': rewards.2 (cannot set '2' in rewards, which is a list of 0)",
        ),
    ],
)
def test_malformed_overrides(override: str, expected: str) -> None:
    assert problems_of(None, [override])[0].startswith(expected)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        run: {steps: 0, output_dir: runs/x}
        rollout: {group_sise: 4, temperature: hot}
        algorithm: {name: ppo2}
        """,
    )
    problems = problems_of(path, ["optim.lr=-1", "eval.n"])
    heads = sorted(p.split(":")[0] for p in problems)
    assert heads == sorted(
        [
            "override 'eval.n'",
            "rollout.group_sise",
            "run.steps",
            "rollout.temperature",
            "algorithm.name",
            "optim.lr",
        ]
    )
    with pytest.raises(ConfigError, match=r"invalid config \(.*recipe.yaml \+ overrides .*\): 6 problems"):
        load_config(path, ["optim.lr=-1", "eval.n"])


def test_validate_checks_programmatic_configs() -> None:
    cfg = Config(rollout=RolloutConfig(group_size="8", top_k=-1))  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert [p.split(":")[0] for p in info.value.problems] == ["rollout.group_size", "rollout.top_k"]
    assert Config().problems() == []


FIELDS = ("estimator", "scale_std", "dynamic_sampling", "epsilon_low", "epsilon_high", "aggregation", "ratio")


@pytest.mark.parametrize(
    ("algo", "preset", "rest"),
    [
        (AlgorithmConfig(), ("grpo", True, False, 0.2, 0.2, "seq_mean", "token"), {}),
        (AlgorithmConfig(name="dr_grpo"), ("grpo", False, False, 0.2, 0.2, "dr_grpo", "token"), {}),
        (AlgorithmConfig(name="maxrl"), ("maxrl", False, False, 0.2, 0.2, "seq_mean", "token"), {}),
        (AlgorithmConfig(name="dapo"), ("grpo", True, True, 0.2, 0.28, "token_mean", "token"), {}),
        (AlgorithmConfig(name="rloo"), ("rloo", False, False, 0.2, 0.2, "seq_mean", "sequence"), {}),
        (
            AlgorithmConfig(
                name="dapo", epsilon_high=0.25, scale_std=False, dynamic_sampling=False, beta=0.04
            ),
            ("grpo", False, False, 0.2, 0.25, "token_mean", "token"),
            {"beta": 0.04},
        ),
        (
            AlgorithmConfig(name="grpo", epsilon_low=0.1, aggregation="token_mean", shared_prompt="off"),
            ("grpo", True, False, 0.1, 0.1, "token_mean", "token"),
            {"shared_prompt": "off"},
        ),
        (
            AlgorithmConfig(
                name="dr_grpo", scale_std=True, aggregation="seq_mean", epochs=2, estimator="rloo"
            ),
            ("rloo", True, False, 0.2, 0.2, "seq_mean", "token"),
            {"epochs": 2, "minibatches": 1},
        ),
    ],
)
def test_presets_fill_only_unset_fields(algo: AlgorithmConfig, preset: tuple, rest: dict) -> None:
    view = algo.resolved()
    assert tuple(getattr(view, k) for k in FIELDS) == preset
    assert {k: getattr(view, k) for k in rest} == rest
    assert view.name == algo.name
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.beta = 1.0  # type: ignore[misc]


def test_algorithm_cross_checks_list_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "algorithm.estimator=rlooo",
                "algorithm.minibatches=5",
                "rollout.prompts_per_step=4",
            ],
        )
    text = str(info.value)
    assert "algorithm.estimator: 'rlooo' (unknown estimator) → did you mean 'rloo'?" in text
    assert "algorithm.minibatches: 5 (more than rollout.prompts_per_step=4" in text
    with pytest.raises(ConfigError, match="gae needs a critic"):
        load_config(None, ["algorithm.estimator=gae"])


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "run.steps=7",
            "run.report_to=[jsonl,wandb]",
            "model.lora.target_modules=[q_proj]",
            "env.options={difficulty: hard, n_rules: 3}",
            "rewards=[{name: flag_decision, weight: 2, params: {strict: true}}, {name: answer_format}]",
            "algorithm.name=dapo",
            "optim.betas=[0.8,0.9]",
            "optim.lr=3e-6",
            "warmstart.enabled=true",
            "warmstart.steps=5",
        ],
    )
    for c in (cfg, Config()):
        path = tmp_path / "round_trip.yaml"
        path.write_text(yaml.safe_dump(config_to_dict(c), sort_keys=False))
        assert load_config(path, []) == c


def test_plugin_names_are_checked_with_everything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        plugins._REGISTRY, "reward", dict(plugins._REGISTRY["reward"])
    )  # no leak to other tests

    @plugins.register_reward("tc.exact")
    def exact(completion: str, reference: dict, outcome: dict, *, strict: bool = False) -> float:
        """1.0 when exactly right."""
        return 1.0

    problems = problems_of(
        None,
        [
            "env.name=polcy_flagging",
            "rewards=[{name: tc.exact, params: {strictt: true}}, {name: tc.exactt}]",
            "rollout.group_size=1",
        ],
        resolve=plugins.resolve,
    )
    assert len(problems) == 4
    assert problems[0].startswith("rollout.group_size: 1")
    assert problems[1].startswith(
        "env.name: 'polcy_flagging' (unknown env) → did you mean 'policy_flagging'?"
    )
    assert problems[2].startswith(
        "rewards.0.params.strictt: true (not a parameter of reward 'tc.exact') → did you mean 'strict'"
    )
    assert problems[3].startswith("rewards.1.name: 'tc.exactt' (unknown reward) → did you mean")
    cfg = load_config(None, ["rewards=[{name: tc.exact, params: {strict: true}}]"], resolve=plugins.resolve)
    assert cfg.rewards[0].params == {"strict": True}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_is_valid(recipe: Path) -> None:
    load_config(recipe, [])


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_names_plugins_that_load(recipe: Path) -> None:
    load_config(recipe, [], resolve=plugins.resolve)


def test_the_vllm_backend_without_its_venv_names_the_setup_script() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["rollout.backend=vllm", "rollout.vllm_python=/no/such/python"])
    assert "rollout.backend: 'vllm' (the vLLM python /no/such/python does not exist)" in str(info.value)
    assert "bash scripts/setup_vllm.sh" in str(info.value)
