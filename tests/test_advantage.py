"""Advantage stage: known rewards → known advantages, std definition as TRL, dynamic sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from trl.trainer.utils import nanstd

from rltk import advantage
from rltk.batch import Group, Rollout
from rltk.env import Task


@dataclass(frozen=True)
class Cfg:
    scale_std: bool
    dynamic_sampling: bool


def make_group(rewards: list[float], tid: str = "t") -> Group:
    task = Task(id=tid, split="train", messages=[], reference={})
    empty = torch.zeros(0)
    rollouts = [
        Rollout(
            task=task,
            turns=[""],
            token_ids=empty.long(),
            loss_mask=empty,
            sample_logp=empty,
            reward=r,
        )
        for r in rewards
    ]
    return Group(task=task, prompt_ids=torch.tensor([1, 2]), rollouts=rollouts)


def test_scale_std_known_values() -> None:
    # rewards [0, 1, 1, 2]: mean 1, unbiased var = (1 + 0 + 0 + 1) / 3, std = sqrt(2/3)
    g = make_group([0.0, 1.0, 1.0, 2.0])
    res = advantage.compute([g], Cfg(scale_std=True, dynamic_sampling=False))
    std = math.sqrt(2 / 3)
    expected = torch.tensor([-1.0, 0.0, 0.0, 1.0]) / (std + 1e-4)
    assert g.advantages is not None
    assert g.advantages.dtype == torch.float32
    assert g.advantages.shape == (4,)
    torch.testing.assert_close(g.advantages, expected, rtol=0, atol=1e-6)
    assert res.groups == [g]
    assert res.metrics["reward/group_std_mean"] == pytest.approx(std, abs=1e-6)
    assert res.metrics["advantage/mean_abs"] == pytest.approx(0.5 / (std + 1e-4), abs=1e-6)


def test_std_is_unbiased_like_trl() -> None:
    rewards = torch.tensor([0.3, -1.2, 2.5, 0.0, 0.7, 1.1])
    # TRL's nanstd (Bessel-corrected) == torch.std(unbiased) != the population std
    assert float(advantage.group_std(rewards)) == pytest.approx(float(nanstd(rewards)), abs=1e-7)
    assert float(advantage.group_std(rewards)) == pytest.approx(float(rewards.std()), rel=1e-6)
    assert float(rewards.std()) != pytest.approx(float(rewards.std(unbiased=False)), abs=1e-3)
    g = make_group(rewards.tolist())
    advantage.compute([g], Cfg(scale_std=True, dynamic_sampling=False))
    # TRL's formula, as in GRPOTrainer._generate_and_score_completions (scale_rewards="group")
    trl_adv = (rewards - rewards.mean()) / (nanstd(rewards) + 1e-4)
    torch.testing.assert_close(g.advantages, trl_adv, rtol=0, atol=1e-6)


def test_no_std_scaling_dr_grpo() -> None:
    g = make_group([0.0, 0.0, 3.0, 1.0])
    advantage.compute([g], Cfg(scale_std=False, dynamic_sampling=False))
    torch.testing.assert_close(g.advantages, torch.tensor([-1.0, -1.0, 2.0, 0.0]), rtol=0, atol=1e-7)


def test_dynamic_sampling_drops_zero_variance_groups() -> None:
    flat1 = make_group([1.0, 1.0, 1.0, 1.0], "a")
    mixed = make_group([0.0, 1.0, 0.0, 1.0], "b")
    flat0 = make_group([0.0, 0.0, 0.0, 0.0], "c")
    res = advantage.compute([flat1, mixed, flat0], Cfg(scale_std=True, dynamic_sampling=True))
    assert [g.task.id for g in res.groups] == ["b"]
    assert res.groups_kept is res.groups
    assert res.metrics["advantage/groups_dropped"] == 2.0
    assert res.metrics["advantage/groups_kept"] == 1.0
    assert res.metrics["reward/frac_zero_std"] == pytest.approx(2 / 3)
    std = math.sqrt(1 / 3)  # unbiased std of [0, 1, 0, 1]
    assert res.metrics["reward/group_std_mean"] == pytest.approx(std / 3, abs=1e-6)
    assert flat1.advantages is None and flat0.advantages is None
    expected = torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (std + 1e-4)
    torch.testing.assert_close(mixed.advantages, expected, rtol=0, atol=1e-6)


def test_without_dynamic_sampling_zero_variance_groups_are_kept_with_zero_advantage() -> None:
    flat = make_group([0.5, 0.5, 0.5], "a")
    mixed = make_group([0.0, 1.0, 2.0], "b")
    res = advantage.compute([flat, mixed], Cfg(scale_std=True, dynamic_sampling=False))
    assert [g.task.id for g in res.groups] == ["a", "b"]
    assert res.metrics["advantage/groups_dropped"] == 0.0
    assert res.metrics["advantage/groups_kept"] == 2.0
    torch.testing.assert_close(flat.advantages, torch.zeros(3), rtol=0, atol=1e-6)


def test_all_groups_dropped() -> None:
    res = advantage.compute([make_group([1.0, 1.0])], Cfg(scale_std=True, dynamic_sampling=True))
    assert res.groups == []
    assert res.metrics["advantage/groups_dropped"] == 1.0
    assert res.metrics["advantage/mean_abs"] == 0.0


def test_nan_reward_is_left_out_and_gets_zero_advantage() -> None:
    g = make_group([0.0, float("nan"), 2.0, 4.0])
    advantage.compute([g], Cfg(scale_std=False, dynamic_sampling=False))
    torch.testing.assert_close(g.advantages, torch.tensor([-2.0, 0.0, 0.0, 2.0]), rtol=0, atol=1e-6)


def test_unknown_estimator() -> None:
    @dataclass(frozen=True)
    class WithEstimator(Cfg):
        estimator: str = "gae"

    with pytest.raises(KeyError, match="gae"):
        advantage.compute([make_group([0.0, 1.0])], WithEstimator(scale_std=True, dynamic_sampling=False))


def test_estimator_registry_is_pluggable(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass(frozen=True)
    class WithEstimator(Cfg):
        estimator: str = "token_level"

    def token_level(group: Group, cfg: advantage.AdvantageConfig) -> torch.Tensor:
        return torch.ones(len(group.rollouts), 3)  # [G, L]

    monkeypatch.setitem(advantage.ESTIMATORS, "token_level", token_level)
    g = make_group([0.0, 1.0])
    res = advantage.compute([g], WithEstimator(scale_std=True, dynamic_sampling=False))
    assert g.advantages.shape == (2, 3)
    assert res.metrics["advantage/mean_abs"] == 1.0
