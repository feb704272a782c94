"""PPO end to end on a tiny model: the critic trains beside the policy, resumes exactly, never exports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sigkill_once_saved, tiny_overrides
from transformers import AutoModelForCausalLM

from rltk.config import ConfigError, load_config
from rltk.export import export
from rltk.net import ValueHead
from rltk.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
VOWELS = "rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]"
PPO = ["algorithm.name=ppo", "algorithm.vf_coef=0.5", VOWELS]


def _critic(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.policy.checkpoint_extra()["critic"].items()}


def test_ppo_trains_policy_and_critic_and_logs_the_critic(tiny_model_dir: str, tmp_path: Path) -> None:
    trainer = Trainer(load_config(RECIPE, [*tiny_overrides(tiny_model_dir, tmp_path, steps=2), *PPO]))
    assert all(float(v.abs().sum()) == 0 for v in _critic(trainer).values())  # zero-initialised
    before = {n: p.clone() for n, p in trainer.policy.lm.named_parameters() if p.requires_grad}
    metrics = trainer.step(0).metrics
    assert metrics["update/optimizer_steps"] == 2  # ppo: 2 epochs of 1 minibatch
    for key in ("critic/explained_variance", "value/loss", "value/clip_frac", "loss/approx_kl"):
        assert key in metrics, key
    assert metrics["critic/value_mean"] == 0.0  # the fresh rollouts met the zero-initialised critic
    assert any(float(v.abs().sum()) > 0 for v in _critic(trainer).values()), "the critic did not learn"
    mean, std = trainer.policy.critic.scale()  # the first step's returns, exactly (debiased)
    assert mean == pytest.approx(metrics["critic/return_mean"]) and std == pytest.approx(
        metrics["critic/return_std"]
    )
    after = dict(trainer.policy.lm.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before), "the policy did not learn"
    trainer.close()


def test_a_frozen_critic_stays_at_zero(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path, steps=1), *PPO, "algorithm.vf_coef=0"]
    trainer = Trainer(load_config(RECIPE, overrides))
    metrics = trainer.step(0).metrics
    assert "value/loss" not in metrics and "critic/explained_variance" in metrics
    assert all(float(v.abs().sum()) == 0 for v in _critic(trainer).values())
    trainer.close()


def test_the_value_head_reads_in_the_running_scale_of_the_returns() -> None:
    head = ValueHead(4, decay=0.5)
    hidden = torch.randn(3, 4)
    assert head.scale() == (0.0, 1.0) and torch.equal(head(hidden), torch.zeros(3))
    head.observe(2.0, 5.0)  # mean 2, variance 1
    assert head.scale() == pytest.approx((2.0, 1.0)) and torch.allclose(head(hidden), torch.full((3,), 2.0))
    head.observe(4.0, 20.0)  # mean 4, variance 4; weights 1/3 and 2/3 once debiased
    mean, std = head.scale()
    assert mean == pytest.approx(10 / 3) and std**2 == pytest.approx(45 / 3 - (10 / 3) ** 2)
    with torch.no_grad():
        head.linear.bias.fill_(1.0)
    assert torch.allclose(head(hidden), torch.full((3,), mean + std))  # V = μ + σ · (w·h + b)
    copy = ValueHead(4, decay=0.5)
    copy.load_state_dict(head.state_dict())  # the scale is saved with the head
    assert copy.scale() == (mean, std)


def test_ppo_takes_groups_of_one_and_grpo_does_not(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path, steps=1), "rollout.group_size=1"]
    trainer = Trainer(load_config(RECIPE, [*overrides, *PPO]))
    assert trainer.step(0).metrics["advantage/groups_kept"] == 2
    trainer.close()
    with pytest.raises(ConfigError, match="compares the rollouts of a task"):
        load_config(RECIPE, [*overrides, VOWELS])


def _train_cmd(model_dir: str, run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "rltk.train", RECIPE, *tiny_overrides(model_dir, run_dir, steps), *PPO]


def _env() -> dict[str, str]:
    path = f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return dict(os.environ, PYTHONPATH=path, RLTK_NO_PROGRESS="1")


def _checkpoint(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The step's trainable weights and critic, as saved."""
    from safetensors.torch import load_file

    folder = run_dir / "checkpoints" / f"step-{step:06d}"
    (weights,) = folder.rglob("*.safetensors")
    extra = torch.load(folder / "extra.pt", weights_only=True)
    return {**load_file(weights), **{f"critic.{k}": v for k, v in extra["critic"].items()}}


def test_a_killed_ppo_run_resumes_to_the_uninterrupted_weights_and_exports_a_plain_lm(
    tiny_model_dir: str, tmp_path: Path
) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(tiny_model_dir, full, 4), env=_env(), check=True, capture_output=True)
    sigkill_once_saved(_train_cmd(tiny_model_dir, killed, 4), _env(), killed, 2)
    assert not (killed / "checkpoints" / "step-000004").exists()
    subprocess.run(_train_cmd(tiny_model_dir, killed, 4), env=_env(), check=True, capture_output=True)
    a, b = _checkpoint(full, 4), _checkpoint(killed, 4)
    assert a.keys() == b.keys() and any(k.startswith("critic.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)

    out = export(full, tmp_path / "export")
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not any("critic" in p.name or "value" in p.name for p in out.iterdir())
