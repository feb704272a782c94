"""Stage "advantage": each kept token's advantage, by an estimator chosen by name.

    groups ──selection.select──▶ kept ──collate, experience pass──▶ micro-batches ──assign──▶ advantages

:func:`rltk.selection.select` drops groups before the update (failures, dynamic sampling). After the
experience pass (old and reference log-probs, values), :func:`assign` runs the configured *estimator* on every
micro-batch and sets ``batch.advantages`` (and ``batch.returns`` for a critic).

Every estimator has one batch-level signature (as verl's ``compute_*_advantage`` functions)::

    estimator(EstimatorInputs(rewards [N], mask [N, L], group_size G,
                              values [N, L] | None, penalty [N, L] | None), cfg)
        -> Estimate(advantages [N] | [N, L], returns [N, L] | None)

Rows come G at a time per task (micro-batches hold whole groups). A sequence-level estimator returns ``[N]``
(every model token of rollout ``i`` gets ``A_i``), a token-level one ``[N, L]``. ``penalty`` is a per-token
cost taken off the reward (``algorithm.kl_in_reward``: ``β·(log π_old - log π_ref)``); sequence-level
estimators subtract its sum over the rollout, GAE subtracts it token by token. A failed rollout (a reward
or the env failed: NaN reward) is in no baseline and gets advantage 0, as if it had never been sampled.
Estimators are registered by name in :data:`ESTIMATORS` (:func:`register`); adding one is one function and
its decorator, or ``algorithm.estimator: pkg.module:function`` for a function in your own package.

Group-relative estimator (GRPO / Dr. GRPO / DAPO), for a group with rewards ``r_1..r_G``::

    mean = (1/G) Σ_j r_j
    std  = sqrt( Σ_j (r_j - mean)² / (G - 1) )        # unbiased (Bessel), as TRL's ``nanstd``
    A_i  = (r_i - mean) / (std + 1e-4)                 # scale_std=True  (GRPO, DAPO)
    A_i  =  r_i - mean                                 # scale_std=False (Dr. GRPO)

This is exactly TRL 1.16's ``GRPOTrainer`` with ``scale_rewards="group"`` / ``"none"`` and
``multi_objective_aggregation="sum_then_normalize"``: TRL's ``nanstd`` applies Bessel's correction, i.e. the
same value as ``torch.std(unbiased=True)`` (the torch default), and adds ``1e-4`` to the std, not to the
variance. Like TRL, a NaN reward is left out of the mean and std and its advantage is set to 0.

Max-likelihood estimator (MaxRL, Tajwar et al. 2026, arXiv 2602.02710), for success rewards in ``[0, 1]``::

    A_i = r_i / mean - 1               # mean > 1e-6
    A_i = -1                           # mean <= 1e-6: no success in the group

GRPO follows ``∇ p(x)``, the gradient of the success rate ``p(x)`` of prompt ``x``; this follows
``∇ log p(x) = ∇ p(x) / p(x)``, the gradient of the log-likelihood of success. With binary rewards and K
successes out of G, ``(1/G) Σ_i A_i ∇log π(y_i) = (1/K) Σ_{success} ∇log π(y_i) - (1/G) Σ_i ∇log π(y_i)``,
an unbiased estimate of the gradient of ``-Σ_{k=1..G} (1-p)^k / k``, the log-likelihood truncated at G
(``tests/test_advantage.py`` checks the expectation exactly). A group with no success keeps the second
term (every sample pushed down with ``A = -1``); dropping it would bias the estimate and leave a prompt the
model gets confidently wrong with no gradient at all. For a task with one right answer it is the
cross-entropy gradient of SFT, estimated on-policy: a prompt the model mostly gets wrong weighs ``1/p`` more,
where GRPO weighs it ``p(1-p)`` (or ``sqrt(p(1-p))`` with std scaling), symmetric in right and wrong.
Rewards outside ``[0, 1]`` are refused. (On the quickstart it did not stop the swing of the answer prior;
neither does SFT at the same lr: ``docs/rl_findings.md``.)

Leave-one-out estimator (RLOO, Ahmadian et al. 2024; TRL's ``RLOOTrainer``)::

    A_i = r_i - (1/(G-1)) Σ_{j≠i} r_j  =  G/(G-1) · (r_i - mean)        # G/(G-1) × Dr. GRPO's

Each sample's baseline leaves the sample out, so the estimate is unbiased (GRPO's mean includes ``r_i``).

GAE (PPO; Schulman et al. 2016), per token over the model's tokens only. The outcome reward sits on the
rollout's last model token; ``penalty`` (if any) is taken off token by token::

    r_t     = 1[t = last] · R - penalty_t
    δ_t     = r_t + γ · V_next(t) - V_t
    A_t     = δ_t + γ λ · A_next(t)                 # next(t): the next model token (env tokens skipped)
    return_t = A_t + V_t                             # the value target

Env tokens (``mask`` 0, multi-turn) are no steps at all: their values are never read and the recursion
carries ``V`` and ``A`` across them unchanged (verl does the same), so garbage values there change
nothing. After the last model token ``V_next = 0`` (the episode ended; a truncated rollout is scored as
the env judged it, no bootstrap). :func:`whiten` then normalises the advantages over the whole step (all
micro-batches, all ranks) when ``cfg.whiten`` is set. :func:`rltk.answer_balance.balance_answers`
(``cfg.balance_answers``) rebalances sequence-level advantages over the whole step.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from rltk.answer_balance import balance_answers
from rltk.batch import Batch

STD_EPS = 1e-4
"""Added to the group std before dividing (TRL: ``advantages / (std_rewards + 1e-4)``)."""


class AdvantageConfig(Protocol):
    """What this stage reads from the config (``config.algorithm.resolved()`` satisfies it)."""

    estimator: str
    scale_std: bool
    dynamic_sampling: bool
    balance_answers: bool
    gamma: float
    lam: float
    whiten: bool


@dataclass
class EstimatorInputs:
    """What every estimator reads: a micro-batch's rollouts, G consecutive rows per task."""

    rewards: torch.Tensor  # [N] the rubric's reward, NaN for a failed rollout
    mask: torch.Tensor  # [N, L] 1 = model token
    group_size: int  # G
    values: torch.Tensor | None = None  # [N, L] the critic's value of each token's state (gae)
    penalty: torch.Tensor | None = None  # [N, L] per-token cost taken off the reward (KL in the reward)


@dataclass
class Estimate:
    """An estimator's output: ``advantages`` ``[N]`` or ``[N, L]``; ``returns`` ``[N, L]`` (value targets)."""

    advantages: torch.Tensor
    returns: torch.Tensor | None = None


Estimator = Callable[[EstimatorInputs, AdvantageConfig], Estimate]
ESTIMATORS: dict[str, Estimator] = {}
"""Advantage estimators by name; ``algorithm.estimator`` picks one."""
GROUPED: set[str] = set()
"""The estimators that compare a task's rollouts (they need 2 scored rollouts per group)."""


def register(name: str, grouped: bool = True) -> Callable[[Estimator], Estimator]:
    """Register an estimator under ``name`` (a decorator); ``grouped``: it compares a group's rollouts."""

    def add(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        if grouped:
            GROUPED.add(name)
        return fn

    return add


def estimator_for(name: str) -> Estimator:
    """The estimator registered as ``name``, or the function at the import path ``pkg.module:function``.

    Raises:
        KeyError: For an unknown name.
        ImportError, AttributeError: For an import path that does not lead to a function.

    """
    if name in ESTIMATORS:
        return ESTIMATORS[name]
    if ":" not in name:
        raise KeyError(f"unknown advantage estimator {name!r}; registered: {sorted(ESTIMATORS)}")
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) std over the last dim, ignoring NaNs, as TRL's ``nanstd``.

    Args:
        rewards: ``[..., G]`` rewards; NaN marks a completion that could not be scored.

    Returns:
        ``[...]`` float32 ``sqrt(Σ (r - mean)² / (n - 1))`` over the ``n`` non-NaN rewards; NaN if ``n < 2``.

    """
    r = rewards.float()
    n = (~torch.isnan(r)).sum(-1)  # [...]
    mean = torch.nanmean(r, dim=-1, keepdim=True)  # [..., 1]
    var = torch.nansum((r - mean) ** 2, dim=-1) / (n - 1).clamp(min=1)  # [...]
    return torch.where(n >= 2, var.sqrt(), torch.full_like(var, float("nan")))


def outcome(inputs: EstimatorInputs) -> torch.Tensor:
    """``[P, G]`` sequence rewards: the rubric's reward less the rollout's summed ``penalty``."""
    r = inputs.rewards.float()
    if inputs.penalty is not None:
        r = r - (inputs.penalty * inputs.mask).sum(-1)
    return r.view(-1, inputs.group_size)


@register("grpo")
def group_relative(inputs: EstimatorInputs, cfg: AdvantageConfig) -> Estimate:
    """GRPO / Dr. GRPO: ``(r - mean) / (std + 1e-4)`` (``cfg.scale_std``) or ``r - mean`` per group.

    >>> x = EstimatorInputs(torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.ones(4, 1), group_size=4)
    >>> group_relative(x, type("Cfg", (), {"scale_std": False})).advantages.tolist()
    [-1.0, 0.0, 0.0, 1.0]

    """
    r = outcome(inputs)  # [P, G]
    adv = r - torch.nanmean(r, dim=1, keepdim=True)
    if cfg.scale_std:
        adv = adv / (group_std(r)[:, None] + STD_EPS)
    return Estimate(torch.nan_to_num(adv, nan=0.0).flatten())  # [N]


@register("rloo")
def leave_one_out(inputs: EstimatorInputs, cfg: AdvantageConfig) -> Estimate:
    """RLOO: ``r_i`` less the mean of the other scored rewards of its group (module docstring).

    >>> x = EstimatorInputs(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.ones(4, 1), group_size=4)
    >>> [round(a, 4) for a in leave_one_out(x, None).advantages.tolist()]
    [1.0, -0.3333, -0.3333, -0.3333]

    """
    r = outcome(inputs)  # [P, G]
    n = (~torch.isnan(r)).sum(1, keepdim=True)  # [P, 1] scored rollouts per group
    baseline = (torch.nansum(r, dim=1, keepdim=True) - r) / (n - 1).clamp(min=1)  # [P, G]
    adv = torch.where(n >= 2, r - baseline, torch.zeros_like(r))
    return Estimate(torch.nan_to_num(adv, nan=0.0).flatten())  # [N]


@register("maxrl")
def max_likelihood(inputs: EstimatorInputs, cfg: AdvantageConfig) -> Estimate:
    """MaxRL: ``r_i / mean - 1`` per group; all -1 when no rollout succeeded (module docstring).

    Raises:
        ValueError: If a reward lies outside ``[0, 1]``.

    >>> x = EstimatorInputs(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.ones(4, 1), group_size=4)
    >>> max_likelihood(x, None).advantages.tolist()
    [3.0, -1.0, -1.0, -1.0]

    """
    r = outcome(inputs)  # [P, G]
    valid = r[~torch.isnan(r)]
    if bool(((valid < 0) | (valid > 1)).any()):
        raise ValueError(
            f"algorithm 'maxrl' needs success rewards in [0, 1], got {valid.tolist()}; "
            "use reward weights that sum to 1 and rewards scored in [0, 1], or algorithm.name=grpo"
        )
    mean = torch.nanmean(r, dim=1, keepdim=True)  # [P, 1]
    adv = torch.where(mean > 1e-6, r / mean.clamp(min=1e-6) - 1.0, torch.full_like(r, -1.0))
    return Estimate(torch.where(torch.isnan(r), torch.zeros_like(adv), adv).flatten())  # [N]


@register("gae", grouped=False)
def gae(inputs: EstimatorInputs, cfg: AdvantageConfig) -> Estimate:
    """Generalised advantage estimation over the model's tokens (module docstring).

    >>> mask = torch.tensor([[1.0, 1.0]])
    >>> x = EstimatorInputs(torch.tensor([1.0]), mask, 1, values=torch.tensor([[0.5, 0.25]]))
    >>> cfg = type("Cfg", (), {"gamma": 1.0, "lam": 1.0})
    >>> gae(x, cfg).advantages.tolist(), gae(x, cfg).returns.tolist()
    ([[0.5, 0.75]], [[1.0, 1.0]])

    """
    if inputs.values is None:
        raise ValueError("estimator 'gae' needs values: set algorithm.critic (PPO) or use another estimator")
    mask = inputs.mask.float()
    values = torch.where(mask > 0, inputs.values.float(), 0.0)  # [N, L] env/padding values never read
    n, length = mask.shape
    rewards = torch.nan_to_num(inputs.rewards.float(), nan=0.0)  # failed rows have mask 0 anyway
    last = (mask * torch.arange(1, length + 1, device=mask.device)).argmax(-1)  # [N] the last model token
    rows = torch.arange(n, device=mask.device)
    token_rewards = torch.zeros_like(mask).index_put((rows, last), rewards) * mask  # [N, L]
    if inputs.penalty is not None:
        token_rewards = token_rewards - inputs.penalty * mask
    adv = torch.zeros_like(mask)
    next_value, next_adv = mask.new_zeros(n), mask.new_zeros(n)
    for t in reversed(range(length)):
        m = mask[:, t]
        delta = token_rewards[:, t] + cfg.gamma * next_value - values[:, t]
        here = delta + cfg.gamma * cfg.lam * next_adv
        adv[:, t] = here * m
        next_value = torch.where(m > 0, values[:, t], next_value)  # env tokens carry both across
        next_adv = torch.where(m > 0, here, next_adv)
    return Estimate(adv, (adv + values) * mask)


AllReduce = Callable[[list[float]], list[float]]
"""Sums a list of floats over ranks (every rank calls it; the identity on one process)."""


def whiten(
    advantages: list[torch.Tensor], masks: list[torch.Tensor], all_reduce: AllReduce
) -> list[torch.Tensor]:
    """Token advantages normalised to mean 0, std 1 over every micro-batch of every rank (masked tokens 0).

    ``all_reduce`` sums a list of floats over ranks (the identity on one process), so the statistics are
    those of the whole step whatever the number of ranks.
    """
    sums = [0.0, 0.0, 0.0]
    for a, m in zip(advantages, masks, strict=True):
        m = m.double()
        sums = [sums[0] + float(m.sum()), sums[1] + float((a * m).sum()), sums[2] + float((a**2 * m).sum())]
    n, s, s2 = all_reduce(sums)
    if n < 2:
        return advantages
    mean = s / n
    var = max(s2 / n - mean**2, 0.0) * n / (n - 1)  # unbiased, as verl's masked_whiten
    return [(a - mean) / math.sqrt(var + 1e-8) * m for a, m in zip(advantages, masks, strict=True)]


def inputs_of(batch: Batch, cfg: AdvantageConfig) -> EstimatorInputs:
    """A micro-batch's estimator inputs; the KL penalty ``β·(old - ref)`` when ``cfg.kl_in_reward``."""
    penalty = None
    if getattr(cfg, "kl_in_reward", False) and cfg.beta > 0:
        if batch.old_logp is None or batch.ref_logp is None:
            raise ValueError("kl_in_reward needs the experience pass's old and reference log-probs")
        penalty = cfg.beta * (batch.old_logp - batch.ref_logp)  # [N, Lc] k1 per token, as verl
    return EstimatorInputs(batch.rewards, batch.loss_mask, batch.group_size, batch.values, penalty)


def assign(
    batches: list[Batch],
    cfg: AdvantageConfig,
    all_reduce: AllReduce | None = None,
) -> dict[str, float]:
    """Set ``advantages`` (and ``returns``) on every micro-batch of a step with ``cfg.estimator``.

    Answer balancing (sequence-level estimators) and whitening (``cfg.whiten``, token-level) act on the
    whole step. Returns ``advantage/mean_abs`` (over kept rollouts, or model tokens) and
    ``advantage/balance_removed``.

    Raises:
        KeyError: If ``cfg.estimator`` names no registered estimator.
        ValueError: From the estimator (e.g. gae without values), or balancing token-level advantages.

    """
    estimator = estimator_for(cfg.estimator)
    estimates = [estimator(inputs_of(b, cfg), cfg) for b in batches]
    advs = [e.advantages for e in estimates]
    removed = 0.0
    if cfg.balance_answers and batches:
        if any(a.dim() != 1 for a in advs):
            raise ValueError(f"balance_answers needs a sequence-level estimator, not {cfg.estimator!r}")
        flat, removed = balance_answers(
            torch.cat(advs),
            [x for b in batches for x in b.answers],
            batches[0].group_size,
            torch.cat([b.keep for b in batches]),
        )
        advs = list(flat.split([len(a) for a in advs]))
    if cfg.whiten and advs and advs[0].dim() == 2:
        advs = whiten(advs, [b.loss_mask for b in batches], all_reduce or (lambda v: v))
    total = count = 0.0
    for batch, adv, est in zip(batches, advs, estimates, strict=True):
        batch.advantages, batch.returns = adv, est.returns
        weight = batch.keep.float() if adv.dim() == 1 else batch.loss_mask
        total += float((adv.abs() * weight).sum())
        count += float(weight.sum())
    return {"advantage/mean_abs": total / count if count else 0.0, "advantage/balance_removed": removed}
