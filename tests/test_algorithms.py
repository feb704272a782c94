"""Every algorithm learns a one-token bandit: estimator, experience and loss wired with the right signs.

The policy is one logit per answer token (P(right) = 0.5 at the start); each step samples G answers for P
prompts, rewards the right one, and runs rltk's advantage stage and loss on a real :class:`Batch`, then an
optimizer step. A sign error anywhere (advantage, ratio, aggregation) pushes P(right) down instead.
"""

from __future__ import annotations

import pytest
import torch

from rltk import advantage, loss
from rltk.batch import Batch
from rltk.config import AlgorithmConfig

P, G, STEPS = 2, 8, 40
RIGHT = 0


def bandit_batch(answers: torch.Tensor) -> Batch:
    """P prompts of one token, G one-token completions each: ``answers`` ``[P*G]``."""
    n = answers.shape[0]
    ones = torch.ones(n, 1)
    return Batch(
        prompt_ids=torch.ones(P, 1, dtype=torch.long),
        prompt_mask=torch.ones(P, 1, dtype=torch.long),
        completion_ids=answers[:, None],  # [N, 1]
        completion_mask=ones.long(),
        loss_mask=ones,
        group_size=G,
        rewards=(answers == RIGHT).float(),  # [N]
        answers=answers.tolist(),
        keep=torch.ones(n, dtype=torch.bool),
    )


def train_bandit(name: str, **overrides: object) -> float:
    """P(right) after STEPS steps; PPO's critic is one value for the one state (zero at the start)."""
    cfg = AlgorithmConfig(name=name, **overrides).resolved()
    torch.manual_seed(0)
    logits = torch.zeros(2, requires_grad=True)  # P(right) = 0.5
    value = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([logits, value], lr=0.1)
    for _ in range(STEPS):
        with torch.no_grad():
            answers = torch.multinomial(logits.softmax(-1), P * G, replacement=True)  # [N]
        batch = bandit_batch(answers)
        if cfg.critic:
            batch.values = value.detach().expand(len(answers), 1)  # [N, 1]
        advantage.assign([batch], cfg)
        for _ in range(cfg.epochs):
            logp = logits.log_softmax(-1)[batch.completion_ids]  # [N, 1]
            if batch.old_logp is None:
                batch.old_logp = logp.detach()
            normalizer = loss.normalizer_for([batch], cfg.aggregation, max_completion_length=1)
            total = loss.policy_loss(logp, batch, cfg, normalizer).loss
            if cfg.critic:
                total = (
                    total
                    + cfg.vf_coef
                    * loss.value_loss(value.expand(len(answers), 1), batch, cfg, normalizer).loss
                )
            total.backward()
            optimizer.step()
            optimizer.zero_grad()
    return float(logits.detach().softmax(-1)[RIGHT])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "maxrl", "rloo", "ppo"])
def test_each_algorithm_learns_the_right_token(name: str) -> None:
    assert train_bandit(name) > 0.9


def test_several_epochs_still_learn() -> None:
    assert train_bandit("rloo", epochs=3) > 0.9


def test_ppo_without_whitening_learns_too() -> None:
    """Unwhitened, the advantages are R - V (γ = 1): the critic's V is the baseline."""
    assert train_bandit("ppo", whiten=False, vf_coef=1.0) > 0.9


def test_a_flipped_advantage_unlearns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: the same loop with the advantage's sign flipped drives P(right) towards 0."""
    grpo = advantage.ESTIMATORS["grpo"]

    def flipped(x: advantage.EstimatorInputs, cfg: object) -> advantage.Estimate:
        return advantage.Estimate(-grpo(x, cfg).advantages)

    monkeypatch.setitem(advantage.ESTIMATORS, "grpo", flipped)
    assert train_bandit("grpo") < 0.1
