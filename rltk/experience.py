"""Stage "experience": the groups a step learns from, as micro-batches with what the update needs done once.

    groups ──selection.select──▶ kept ──collate──▶ micro-batches ──Policy.experience (no grad)──▶
    reference and old log-probs, values ──advantage.assign──▶ advantages, returns

The policy's own log-probs (``old_logp``) come from the no-grad pass only where an optimizer step comes
before some micro-batch's update (``minibatches > 1``) or the reward takes the KL (``kl_in_reward``); with
one minibatch the first epoch's forward gives them for free, so GRPO's step pays no extra pass.
"""

from __future__ import annotations

import torch

from rltk import advantage, selection
from rltk.advantage import AllReduce
from rltk.batch import Batch, Group, collate, split_rows
from rltk.config import AlgorithmView
from rltk.policy import Policy


def micro_batches(
    groups: list[Group], per_micro_batch: int, minibatches: int, pad_id: int, device: torch.device
) -> list[Batch]:
    """This rank's micro-batches of whole groups, on ``device``.

    At least ``minibatches`` of them where there are that many groups.
    """
    per_mb = min(per_micro_batch, -(-len(groups) // minibatches) or 1)
    batches = [collate(groups[i : i + per_mb], pad_id) for i in range(0, len(groups), per_mb)]
    return [b.to(device) for b in batches]


def make_experience(
    policy: Policy,
    algo: AlgorithmView,
    groups: list[Group],
    *,
    per_micro_batch: int,
    pad_id: int,
    device: torch.device,
    all_reduce: AllReduce,
    rows_per_micro_batch: int = 0,
) -> tuple[list[Batch], dict[str, float]]:
    """The groups the step learns from, as micro-batches with their no-grad pass and advantages done.

    ``rows_per_micro_batch`` > 0: once the advantages are set (on whole groups), each micro-batch is split
    into pieces of that many rollouts of one group for the update (:func:`rltk.batch.split_rows`).

    Returns the micro-batches and the metrics of selection, advantages and (with a critic) the critic.
    """
    kept = selection.select(groups, algo)
    batches = micro_batches(kept.groups, per_micro_batch, algo.minibatches, pad_id, device)
    old = algo.minibatches > 1 or algo.kl_in_reward
    for batch in batches:
        policy.experience(batch, old=old)
    metrics = advantage.assign(batches, algo, all_reduce)
    if policy.critic is not None:
        critic, moments = critic_metrics(batches, all_reduce)
        if moments is not None and algo.vf_coef > 0:  # a frozen critic keeps μ = 0, σ = 1: values stay 0
            policy.critic.observe(*moments)
        metrics.update(critic)
    if rows_per_micro_batch:
        batches = [piece for b in batches for piece in split_rows(b, rows_per_micro_batch)]
    return batches, {**kept.metrics, **metrics}


def critic_metrics(
    batches: list[Batch], all_reduce: AllReduce
) -> tuple[dict[str, float], tuple[float, float] | None]:
    """How well the critic predicted this step's fresh rollouts, before the update (all ranks).

    ``critic/explained_variance`` = 1 - Var(R - V) / Var(R) over the model tokens (1: perfect, 0: no
    better than a constant, < 0: worse).

    Returns:
        The metrics, and the returns' mean and mean square over the model tokens (what
        :meth:`rltk.net.ValueHead.observe` takes); ``({}, None)`` with fewer than 2 tokens.

    """
    local = [0.0] * 5
    for b in batches:
        m, r, v = b.loss_mask.double(), b.returns.double(), b.values.double()  # [P*G, Lc] each
        terms = (m, r * m, r**2 * m, (r - v) * m, (r - v) ** 2 * m)
        local = [x + float(t.sum()) for x, t in zip(local, terms, strict=True)]
    n, s_r, s_r2, s_d, s_d2 = all_reduce(local)
    if n < 2:
        return {}, None
    var_r, var_d = s_r2 / n - (s_r / n) ** 2, s_d2 / n - (s_d / n) ** 2
    metrics = {
        "critic/explained_variance": 1.0 - var_d / var_r if var_r > 1e-12 else 0.0,
        "critic/return_mean": s_r / n,
        "critic/return_std": max(var_r, 0.0) ** 0.5,
        "critic/value_mean": (s_r - s_d) / n,
    }
    return metrics, (s_r / n, s_r2 / n)
