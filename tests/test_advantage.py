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
    balance_answers: bool = False
    estimator: str = "group_relative"


def make_group(rewards: list[float], tid: str = "t", answers: list[str | None] | None = None) -> Group:
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
            outcome={"answer": answers[i]} if answers else {},
        )
        for i, r in enumerate(rewards)
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


def test_balance_answers_zeroes_each_answer_class_net_advantage() -> None:
    # Three FLAG-labelled groups, one CLEAR-labelled: plain GRPO pushes the prior of FLAG up.
    flags = [make_group([1, 0, 0, 1], f"f{i}", ["FLAG", "CLEAR", "CLEAR", "FLAG"]) for i in range(3)]
    clear = make_group([0, 1, 1, 0], "c", ["FLAG", "CLEAR", "CLEAR", "FLAG"])
    groups = [*flags, clear]
    advantage.compute(groups, Cfg(scale_std=True, dynamic_sampling=False))
    assert sum(float(g.advantages[0] + g.advantages[3]) for g in groups) > 1  # net push on FLAG
    res = advantage.compute(groups, Cfg(scale_std=True, dynamic_sampling=False, balance_answers=True))
    for g in groups:
        assert float(g.advantages.sum()) == pytest.approx(0, abs=1e-6)  # groups still sum to 0
        assert float(g.advantages[0]) == pytest.approx(float(g.advantages[3]))  # same answer, same reward
    net_flag = sum(float(g.advantages[0] + g.advantages[3]) for g in groups)
    assert net_flag == pytest.approx(0, abs=1e-5)
    # Still contrastive: FLAG up where it was right, down where it was wrong.
    assert float(flags[0].advantages[0]) > 0 > float(clear.advantages[0])
    assert 0 < res.metrics["advantage/balance_removed"] < 1


def test_balance_answers_leaves_malformed_answers_pushed_down() -> None:
    g = make_group([1, 0, 0], "a", ["FLAG", "CLEAR", None])
    h = make_group([0, 1, 0], "b", ["FLAG", "CLEAR", None])
    advantage.compute([g, h], Cfg(scale_std=False, dynamic_sampling=False, balance_answers=True))
    net = {k: float(g.advantages[i] + h.advantages[i]) for i, k in enumerate(["FLAG", "CLEAR", None])}
    assert net["FLAG"] == pytest.approx(net["CLEAR"], abs=1e-6)
    assert net[None] == pytest.approx(-2 / 3, abs=1e-6)  # unchanged: each group gave it -1/3


def test_balance_answers_an_answer_only_ever_rewarded_gets_no_push() -> None:
    g = make_group([1, 0], "a", ["FLAG", "CLEAR"])
    advantage.compute([g], Cfg(scale_std=False, dynamic_sampling=False, balance_answers=True))
    torch.testing.assert_close(g.advantages, torch.zeros(2))


def test_max_likelihood_known_values_and_group_without_success() -> None:
    cfg = Cfg(scale_std=False, dynamic_sampling=False, estimator="max_likelihood")
    one, none = make_group([1, 0, 0, 0], "a"), make_group([0, 0, 0], "b")
    advantage.compute([one, none], cfg)
    torch.testing.assert_close(one.advantages, torch.tensor([3.0, -1.0, -1.0, -1.0]))
    torch.testing.assert_close(none.advantages, torch.full((3,), -1.0))


def test_max_likelihood_refuses_rewards_outside_unit_interval() -> None:
    cfg = Cfg(scale_std=False, dynamic_sampling=False, estimator="max_likelihood")
    with pytest.raises(ValueError, match=r"\[0, 1\].*algorithm.name=grpo"):
        advantage.compute([make_group([1.0, -1.0], "a")], cfg)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_max_likelihood_expected_gradient_is_truncated_log_likelihood(p: float) -> None:
    """Exact expectation over all 2^G outcomes of a two-answer policy with logit l (p = sigmoid(l)).

    MaxRL's estimator (1/G) Σ_i A_i ∂log π(y_i)/∂l has expectation ∂/∂l of -Σ_{k=1..G} (1-p)^k / k (the
    log-likelihood of success truncated at G), i.e. Σ_k (1-p)^(k-1) · p(1-p); GRPO without std scaling gives
    only the k = 1 term, p(1-p).
    """
    g = 3
    cfg = Cfg(scale_std=False, dynamic_sampling=False, estimator="max_likelihood")
    expected = 0.0
    for outcome in range(2**g):
        wins = [(outcome >> i) & 1 for i in range(g)]
        prob = math.prod(p if w else 1 - p for w in wins)
        group = make_group([float(w) for w in wins])
        advantage.compute([group], cfg)
        score = [(1 - p) if w else -p for w in wins]  # ∂ log π(y)/∂l for the right / wrong answer
        expected += prob * sum(a * s for a, s in zip(group.advantages.tolist(), score, strict=True)) / g
    truncated_ml = sum((1 - p) ** (k - 1) * p * (1 - p) for k in range(1, g + 1))
    assert expected == pytest.approx(truncated_ml, rel=1e-5)
