"""Advantage stage: known rewards → known advantages (std as TRL, RLOO, MaxRL, GAE by hand), group selection,
answer balancing, whitening over ranks, and the estimator registry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from trl.trainer.utils import nanstd

from rltk import advantage, selection
from rltk.advantage import EstimatorInputs
from rltk.batch import Group, Rollout, collate
from rltk.env import Task


@dataclass(frozen=True)
class Cfg:
    scale_std: bool = True
    dynamic_sampling: bool = False
    balance_answers: bool = False
    estimator: str = "grpo"
    gamma: float = 1.0
    lam: float = 1.0
    whiten: bool = False
    beta: float = 0.0
    kl_in_reward: bool = False


def make_group(rewards: list[float], tid: str = "t", answers: list[str | None] | None = None) -> Group:
    task = Task(id=tid, split="train", messages=[], reference={})
    rollouts = [
        Rollout(
            task=task,
            turns=[""],
            token_ids=torch.tensor([5, 6]),
            loss_mask=torch.ones(2),
            sample_logp=torch.zeros(2),
            reward=r,
            outcome={"answer": answers[i]} if answers else {},
        )
        for i, r in enumerate(rewards)
    ]
    return Group(task=task, prompt_ids=torch.tensor([1, 2]), rollouts=rollouts)


def estimate(rewards: list[float], cfg: Cfg, group_size: int | None = None) -> torch.Tensor:
    """The estimator's sequence-level advantages of the given rewards (one group unless told)."""
    x = EstimatorInputs(torch.tensor(rewards), torch.ones(len(rewards), 2), group_size or len(rewards))
    return advantage.ESTIMATORS[cfg.estimator](x, cfg).advantages


def assign(groups: list[Group], cfg: Cfg) -> tuple[list[torch.Tensor], dict[str, float]]:
    """Advantages per group through the trainer's path: select, collate, assign."""
    kept = selection.select(groups, cfg).groups
    batches = [collate([g], pad_id=0) for g in kept]
    metrics = advantage.assign(batches, cfg)
    return [b.advantages for b in batches], metrics


def test_scale_std_known_values() -> None:
    # rewards [0, 1, 1, 2]: mean 1, unbiased var = (1 + 0 + 0 + 1) / 3, std = sqrt(2/3)
    (adv,), metrics = assign([make_group([0.0, 1.0, 1.0, 2.0])], Cfg())
    std = math.sqrt(2 / 3)
    expected = torch.tensor([-1.0, 0.0, 0.0, 1.0]) / (std + 1e-4)
    assert adv.dtype == torch.float32 and adv.shape == (4,)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)
    assert metrics["advantage/mean_abs"] == pytest.approx(0.5 / (std + 1e-4), abs=1e-6)
    sel = selection.select([make_group([0.0, 1.0, 1.0, 2.0])], Cfg())
    assert sel.metrics["reward/group_std_mean"] == pytest.approx(std, abs=1e-6)


def test_std_is_unbiased_like_trl() -> None:
    rewards = torch.tensor([0.3, -1.2, 2.5, 0.0, 0.7, 1.1])
    # TRL's nanstd (Bessel-corrected) == torch.std(unbiased) != the population std
    assert float(advantage.group_std(rewards)) == pytest.approx(float(nanstd(rewards)), abs=1e-7)
    assert float(advantage.group_std(rewards)) == pytest.approx(float(rewards.std()), rel=1e-6)
    assert float(rewards.std()) != pytest.approx(float(rewards.std(unbiased=False)), abs=1e-3)
    # TRL's formula, as in GRPOTrainer._generate_and_score_completions (scale_rewards="group")
    trl_adv = (rewards - rewards.mean()) / (nanstd(rewards) + 1e-4)
    torch.testing.assert_close(estimate(rewards.tolist(), Cfg()), trl_adv, rtol=0, atol=1e-6)


def test_groups_are_estimated_apart() -> None:
    adv = estimate([0.0, 2.0, 10.0, 30.0], Cfg(scale_std=False), group_size=2)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -10.0, 10.0]))


def test_no_std_scaling_dr_grpo() -> None:
    adv = estimate([0.0, 0.0, 3.0, 1.0], Cfg(scale_std=False))
    torch.testing.assert_close(adv, torch.tensor([-1.0, -1.0, 2.0, 0.0]), rtol=0, atol=1e-7)


def test_rloo_is_dr_grpo_times_g_over_g_minus_one() -> None:
    rewards = [0.3, -1.2, 2.5, 0.0, 0.7, 1.1]
    g = len(rewards)
    rloo = estimate(rewards, Cfg(estimator="rloo"))
    dr_grpo = estimate(rewards, Cfg(scale_std=False))
    torch.testing.assert_close(rloo, dr_grpo * g / (g - 1), rtol=0, atol=1e-6)
    # each baseline leaves its own sample out
    r = torch.tensor(rewards)
    by_hand = torch.stack([r[i] - torch.cat([r[:i], r[i + 1 :]]).mean() for i in range(g)])
    torch.testing.assert_close(rloo, by_hand, rtol=0, atol=1e-6)


def test_rloo_leaves_a_failed_rollout_out_of_every_baseline() -> None:
    adv = estimate([1.0, float("nan"), 0.0, 0.0], Cfg(estimator="rloo"))
    torch.testing.assert_close(adv, torch.tensor([1.0, 0.0, -0.5, -0.5]))


def test_dynamic_sampling_drops_zero_variance_groups() -> None:
    flat1 = make_group([1.0, 1.0, 1.0, 1.0], "a")
    mixed = make_group([0.0, 1.0, 0.0, 1.0], "b")
    flat0 = make_group([0.0, 0.0, 0.0, 0.0], "c")
    sel = selection.select([flat1, mixed, flat0], Cfg(dynamic_sampling=True))
    assert [g.task.id for g in sel.groups] == ["b"]
    assert sel.metrics["advantage/groups_dropped"] == 2.0
    assert sel.metrics["advantage/groups_kept"] == 1.0
    assert sel.metrics["reward/frac_zero_std"] == pytest.approx(2 / 3)
    std = math.sqrt(1 / 3)  # unbiased std of [0, 1, 0, 1]
    assert sel.metrics["reward/group_std_mean"] == pytest.approx(std / 3, abs=1e-6)
    (adv,), _ = assign([mixed], Cfg(dynamic_sampling=True))
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (std + 1e-4), rtol=0, atol=1e-6)


def test_without_dynamic_sampling_zero_variance_groups_are_kept_with_zero_advantage() -> None:
    advs, _ = assign([make_group([0.5, 0.5, 0.5], "a"), make_group([0.0, 1.0, 2.0], "b")], Cfg())
    assert len(advs) == 2
    torch.testing.assert_close(advs[0], torch.zeros(3), rtol=0, atol=1e-6)


def test_all_groups_dropped() -> None:
    sel = selection.select([make_group([1.0, 1.0])], Cfg(dynamic_sampling=True))
    assert sel.groups == [] and sel.metrics["advantage/groups_dropped"] == 1.0
    assert advantage.assign([], Cfg())["advantage/mean_abs"] == 0.0


def test_a_group_failures_leave_with_one_scored_rollout_is_dropped() -> None:
    sel = selection.select([make_group([float("nan"), 1.0, float("nan")])], Cfg())
    assert sel.groups == [] and sel.metrics["advantage/groups_failed"] == 1.0


def test_nan_reward_is_left_out_and_gets_zero_advantage() -> None:
    adv = estimate([0.0, float("nan"), 2.0, 4.0], Cfg(scale_std=False))
    torch.testing.assert_close(adv, torch.tensor([-2.0, 0.0, 0.0, 2.0]), rtol=0, atol=1e-6)


def test_unknown_estimator() -> None:
    batch = collate([make_group([0.0, 1.0])], pad_id=0)
    with pytest.raises(KeyError, match="gea"):
        advantage.assign([batch], Cfg(estimator="gea"))


def test_estimator_registry_is_pluggable(monkeypatch: pytest.MonkeyPatch) -> None:
    def token_level(x: EstimatorInputs, cfg: Cfg) -> advantage.Estimate:
        return advantage.Estimate(torch.ones_like(x.mask) * x.mask)  # [N, L]

    monkeypatch.setitem(advantage.ESTIMATORS, "token_level", token_level)
    (adv,), metrics = assign([make_group([0.0, 1.0])], Cfg(estimator="token_level"))
    assert adv.shape == (2, 2)
    assert metrics["advantage/mean_abs"] == 1.0


def test_balance_answers_zeroes_each_answer_class_net_advantage() -> None:
    # Three FLAG-labelled groups, one CLEAR-labelled: plain GRPO pushes the prior of FLAG up.
    answers = ["FLAG", "CLEAR", "CLEAR", "FLAG"]
    groups = [make_group([1, 0, 0, 1], f"f{i}", answers) for i in range(3)]
    groups.append(make_group([0, 1, 1, 0], "c", answers))
    plain, _ = assign(groups, Cfg())
    assert sum(float(a[0] + a[3]) for a in plain) > 1  # net push on FLAG
    advs, metrics = assign(groups, Cfg(balance_answers=True))
    for a in advs:
        assert float(a.sum()) == pytest.approx(0, abs=1e-6)  # groups still sum to 0
        assert float(a[0]) == pytest.approx(float(a[3]))  # same answer, same reward
    assert sum(float(a[0] + a[3]) for a in advs) == pytest.approx(0, abs=1e-5)
    # Still contrastive: FLAG up where it was right, down where it was wrong.
    assert float(advs[0][0]) > 0 > float(advs[3][0])
    assert 0 < metrics["advantage/balance_removed"] < 1


def test_balance_answers_leaves_malformed_answers_pushed_down() -> None:
    g = make_group([1, 0, 0], "a", ["FLAG", "CLEAR", None])
    h = make_group([0, 1, 0], "b", ["FLAG", "CLEAR", None])
    (a, b), _ = assign([g, h], Cfg(scale_std=False, balance_answers=True))
    net = {k: float(a[i] + b[i]) for i, k in enumerate(["FLAG", "CLEAR", None])}
    assert net["FLAG"] == pytest.approx(net["CLEAR"], abs=1e-6)
    assert net[None] == pytest.approx(-2 / 3, abs=1e-6)  # unchanged: each group gave it -1/3


def test_balance_answers_an_answer_only_ever_rewarded_gets_no_push() -> None:
    (adv,), _ = assign(
        [make_group([1, 0], "a", ["FLAG", "CLEAR"])], Cfg(scale_std=False, balance_answers=True)
    )
    torch.testing.assert_close(adv, torch.zeros(2))


def test_max_likelihood_known_values_and_group_without_success() -> None:
    adv = estimate([1, 0, 0, 0, 0, 0, 0, 0], Cfg(estimator="maxrl"), group_size=4)
    torch.testing.assert_close(adv, torch.tensor([3.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]))


def test_max_likelihood_refuses_rewards_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\].*algorithm.name=grpo"):
        estimate([1.0, -1.0], Cfg(estimator="maxrl"))


def gae_by_hand(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE over one episode's steps (no env tokens): A_t = Σ_k (γλ)^k δ_{t+k}."""
    n = len(values)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


def test_gae_matches_the_textbook_formula() -> None:
    gamma, lam = 0.9, 0.8
    values = [0.2, -0.1, 0.4, 0.3]
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # a padded row: the reward sits on token 3
    x = EstimatorInputs(
        torch.tensor([1.0]), mask, 1, values=torch.tensor([[*values, 99.0]])
    )  # padding value: garbage
    est = advantage.gae(x, Cfg(estimator="gae", gamma=gamma, lam=lam))
    expected = gae_by_hand([0.0, 0.0, 0.0, 1.0], values, gamma, lam)
    torch.testing.assert_close(est.advantages[0, :4], torch.tensor(expected), rtol=0, atol=1e-6)
    assert est.advantages[0, 4] == 0 and est.returns[0, 4] == 0
    torch.testing.assert_close(est.returns[0, :4], torch.tensor(expected) + torch.tensor(values))
    # by hand for the last two tokens: δ_3 = 1 - 0.3 = 0.7; δ_2 = 0.9·0.3 - 0.4 = -0.13
    assert float(est.advantages[0, 3]) == pytest.approx(0.7)
    assert float(est.advantages[0, 2]) == pytest.approx(-0.13 + 0.9 * 0.8 * 0.7)


def test_gae_skips_env_tokens_of_a_two_turn_episode_whatever_their_values() -> None:
    gamma, lam = 0.95, 0.5
    # turn 1: 2 model tokens, then 3 env tokens, then turn 2: 2 model tokens
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    model_values = [0.1, 0.5, -0.2, 0.6]
    runs = []
    for garbage in ([0.0, 0.0, 0.0], [1e6, -3e5, float("nan")]):
        values = torch.tensor([[0.1, 0.5, *garbage, -0.2, 0.6]])
        x = EstimatorInputs(torch.tensor([2.0]), mask, 1, values=values)
        runs.append(advantage.gae(x, Cfg(estimator="gae", gamma=gamma, lam=lam)))
    expected = gae_by_hand([0.0, 0.0, 0.0, 2.0], model_values, gamma, lam)
    for est in runs:
        torch.testing.assert_close(est.advantages[0, [0, 1, 5, 6]], torch.tensor(expected), rtol=0, atol=1e-6)
        assert (est.advantages[0, 2:5] == 0).all() and (est.returns[0, 2:5] == 0).all()


def test_gae_takes_a_per_token_penalty_off_the_reward() -> None:
    mask = torch.ones(1, 2)
    values = torch.zeros(1, 2)
    penalty = torch.tensor([[0.25, 0.5]])
    x = EstimatorInputs(torch.tensor([1.0]), mask, 1, values=values, penalty=penalty)
    est = advantage.gae(x, Cfg(estimator="gae"))
    torch.testing.assert_close(est.advantages, torch.tensor([[0.25, 0.5]]))  # γ = λ = 1: reward-to-go


def test_whitening_is_the_same_on_one_and_two_ranks() -> None:
    gen = torch.Generator().manual_seed(0)
    advs = [torch.randn(3, 5, generator=gen), torch.randn(2, 4, generator=gen)]
    masks = [(torch.rand(3, 5, generator=gen) > 0.3).float(), (torch.rand(2, 4, generator=gen) > 0.3).float()]
    whole = advantage.whiten(advs, masks, lambda v: v)
    flat = torch.cat([a[m > 0] for a, m in zip(whole, masks, strict=True)])
    assert float(flat.mean()) == pytest.approx(0, abs=1e-6) and float(flat.std()) == pytest.approx(
        1, abs=1e-5
    )
    # two ranks, one micro-batch each: each whitens its own tensors with the statistics summed over both
    # (the real two-process check: tests/test_distributed.py)
    both = _sum_of_both(advs, masks)
    split = [advantage.whiten([a], [m], lambda _mine: both) for a, m in zip(advs, masks, strict=True)]
    for got, want in zip(split, whole, strict=True):
        torch.testing.assert_close(got[0], want, rtol=0, atol=1e-6)


def _sum_of_both(advs: list[torch.Tensor], masks: list[torch.Tensor]) -> list[float]:
    """What the all-reduce returns on either of two ranks holding one of ``advs`` each."""
    return [
        sum(float(m.sum()) for m in masks),
        sum(float((a * m.double()).sum()) for a, m in zip(advs, masks, strict=True)),
        sum(float((a**2 * m.double()).sum()) for a, m in zip(advs, masks, strict=True)),
    ]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_max_likelihood_expected_gradient_is_truncated_log_likelihood(p: float) -> None:
    """Exact expectation over all 2^G outcomes of a two-answer policy with logit l (p = sigmoid(l)).

    MaxRL's estimator (1/G) Σ_i A_i ∂log π(y_i)/∂l has expectation ∂/∂l of -Σ_{k=1..G} (1-p)^k / k (the
    log-likelihood of success truncated at G), i.e. Σ_k (1-p)^(k-1) · p(1-p); GRPO without std scaling gives
    only the k = 1 term, p(1-p).
    """
    g = 3
    expected = 0.0
    for outcome in range(2**g):
        wins = [(outcome >> i) & 1 for i in range(g)]
        prob = math.prod(p if w else 1 - p for w in wins)
        adv = estimate([float(w) for w in wins], Cfg(estimator="maxrl"))
        score = [(1 - p) if w else -p for w in wins]  # ∂ log π(y)/∂l for the right / wrong answer
        expected += prob * sum(a * s for a, s in zip(adv.tolist(), score, strict=True)) / g
    truncated_ml = sum((1 - p) ** (k - 1) * p * (1 - p) for k in range(1, g + 1))
    assert expected == pytest.approx(truncated_ml, rel=1e-5)


def test_the_readme_estimator_example_registers_and_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "adding an estimator" block, run as written; then by name through the advantage stage."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("Adding an estimator is one function")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.setattr(advantage, "ESTIMATORS", dict(advantage.ESTIMATORS))
    exec(compile(block, "README.md", "exec"), {})
    (adv,), _ = assign([make_group([0.0, 1.0, 5.0])], Cfg(estimator="median_baseline"))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 4.0]))


def test_an_estimator_by_import_path() -> None:
    (adv,), _ = assign([make_group([0.0, 2.0])], Cfg(estimator="rltk.advantage:leave_one_out"))
    torch.testing.assert_close(adv, torch.tensor([-2.0, 2.0]))
