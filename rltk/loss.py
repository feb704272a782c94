r"""Stage "loss": the clipped policy-gradient loss of GRPO / Dr. GRPO / DAPO / RLOO, with an optional KL term.

Per token ``t`` of completion ``i`` (only where ``loss_mask[i, t] = 1``)::

    ρ_it   = exp(logp_it - old_it)                               # importance ratio (1 when on-policy)
    L^clip = -min(ρ_it · A_i, clip(ρ_it, 1 - ε_low, 1 + ε_high) · A_i)
    KL_it  = (exp(ref_it - logp_it) - (ref_it - logp_it) - 1) · ρ_it   # k3 estimator × ratio
    H_it   = -Σ_v π_θ(v | ·) log π_θ(v | ·)                      # entropy of the next-token distribution
    ℓ_it   = L^clip + β · KL_it - c_H · H_it                       # c_H = entropy_coef (0 = off)

``A_i`` is the completion's advantage (or ``A_it`` for token-level advantages ``[P*G, Lc]``). The KL term
is Schulman's k3 estimator of KL(π_θ ‖ π_ref), multiplied by ``ρ_it`` as TRL does with
``use_bias_correction_kl=True`` (its default): the tokens were sampled from π_old, so ``ρ`` reweights the
estimator to π_θ; the gradient flows through both factors. Set ``cfg.kl_bias_correction = False`` to drop
the ``ρ`` factor (TRL's ``use_bias_correction_kl=False``). The entropy bonus (verl's ``entropy_coeff``)
keeps sampling from collapsing onto one answer: a group whose G samples agree has zero advantage, so
nothing pulls a policy back from a confident wrong answer except a term like this one or the KL.

Truncated importance sampling (``cfg.tis_cap`` > 0; TRL's and verl's correction for a sampler that is not
the trainer, such as vLLM or bf16 sampling): each token's loss is weighted by
``min(exp(old_it - sample_it), cap)``, the ratio of the trainer's policy to the sampler's, truncated.

With ``cfg.ratio = "sequence"`` (TRL's ``RLOOTrainer``) the importance ratio is the rollout's,
``ρ_i = exp(Σ_t m_it (logp_it - old_it))``, clipped as above against the rollout's advantage ``A_i``; every
token of the rollout carries that surrogate (``ℓ_it = L_i``), so ``seq_mean`` averages exactly the
per-rollout losses, as TRL does (``token_mean`` weighs each rollout by its length). With
``cfg.kl_in_reward`` the KL is no loss term: the advantage stage took ``β·(old - ref)`` off the reward
token by token (:mod:`rltk.advantage`).

Aggregation, over the *whole* optimizer-step batch ``B`` (all micro-batches, all ranks)::

    token_mean (DAPO, TRL "dapo"):     loss = Σ_i Σ_t m_it ℓ_it / Σ_i Σ_t m_it
    seq_mean   (GRPO, TRL "grpo"):     loss = Σ_i [Σ_t m_it ℓ_it / max(1, Σ_t m_it)] / N_seq
    dr_grpo    (Dr. GRPO, "dr_grpo"):  loss = Σ_i Σ_t m_it ℓ_it / (N_seq · max_completion_length)

:func:`policy_loss` computes the numerator on one micro-batch and divides by the global ``normalizer``
(the denominator above, from :func:`normalizer_for`), so the micro-batch losses *sum* to the full-batch
loss and their gradients accumulate to the full-batch gradient (no extra division by the number of
accumulation steps). In TRL terms: ``dapo``'s normalizer is ``num_items_in_batch`` (loss-mask tokens over
the generation batch, all ranks); ``grpo`` and ``dr_grpo`` take a micro-batch mean and divide by the
accumulation steps, which equals the global form above when micro-batches have the same number of
sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from rltk.batch import Batch

Aggregation = Literal["token_mean", "seq_mean", "dr_grpo"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean", "dr_grpo")


class LossConfig(Protocol):
    """What :func:`policy_loss` reads from the config (``config.algorithm.resolved()`` satisfies it).

    ``value_clip`` is read by :func:`value_loss` only. Optional, read with ``getattr``:
    ``kl_bias_correction: bool`` (default True), ``entropy_coef: float``
    (default 0), ``ratio: str`` (``"token"`` or ``"sequence"``, default ``"token"``), ``kl_in_reward: bool``
    (default False), ``tis_cap: float`` (default 0 = off).
    """

    epsilon_low: float
    epsilon_high: float
    beta: float
    aggregation: str
    value_clip: float


@dataclass
class LossOutput:
    """The loss of one micro-batch and its metrics.

    Attributes:
        loss: Scalar, this micro-batch's share of the full-batch loss (call ``backward`` on it).
        metrics: Token means over this micro-batch's loss-mask tokens (as TRL's ``global_masked_mean``):
            ``loss/clip_low_frac`` (ρ < 1 - ε_low and A < 0), ``loss/clip_high_frac`` (ρ > 1 + ε_high and
            A > 0), ``loss/clip_region_frac`` (either), ``loss/ratio_mean``, ``loss/kl_mean`` (k3 × ρ,
            only when β > 0); plus ``loss/tokens`` (the loss-mask token count, the weight to average the
            means over micro-batches) and ``loss/value`` (``loss.item()``, sums to the full-batch loss).

    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def normalizer_for(
    batches: Sequence[Batch],
    aggregation: str,
    max_completion_length: int | None = None,
    all_reduce: Callable[[float], float] | None = None,
) -> float:
    """Count the global denominator of the loss for one optimizer step (all micro-batches, all ranks).

    ::

        token_mean: Σ_{ranks} Σ_{micro-batches} Σ loss_mask
        seq_mean:   Σ_{ranks} Σ_{micro-batches} N_seq
        dr_grpo:    Σ_{ranks} Σ_{micro-batches} N_seq · max_completion_length

    ``N_seq`` counts the rows ``batch.keep`` keeps: a failed rollout is not in the batch, as far as the loss
    can tell (its ``loss_mask`` is all zero too).

    With this normalizer, the gradients of the micro-batch losses *summed over micro-batches and ranks*
    are the full-batch gradient. A data-parallel wrapper that *averages* gradients over ``W`` ranks (torch
    DDP, accelerate) divides that sum by ``W``: compensate once, either by passing ``normalizer / W`` to
    :func:`policy_loss` or by calling ``backward`` on ``loss * W`` (not both). TRL's ``dapo`` does the
    former (``num_items_in_batch / num_processes``).

    Args:
        batches: Every micro-batch this rank will backpropagate before the optimizer step (may be empty,
            e.g. when dynamic sampling dropped every group; the rank must still call ``all_reduce``).
        aggregation: ``token_mean`` | ``seq_mean`` | ``dr_grpo``.
        max_completion_length: The *configured* completion budget (``rollout.max_new_tokens``), constant
            across steps, not the batch's padded length; needed for ``dr_grpo`` only.
        all_reduce: Multi-rank only: sums a float over ranks (every rank must call this function).

    Returns:
        The global count (a float holding an integer). 0 means there is nothing to train on this step
        (every rank empty): skip the update rather than calling :func:`policy_loss`.

    Raises:
        ValueError: On an unknown aggregation, or ``dr_grpo`` without ``max_completion_length``.

    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    if aggregation == "dr_grpo" and (max_completion_length is None or max_completion_length <= 0):
        raise ValueError("aggregation 'dr_grpo' needs max_completion_length > 0")
    local = 0.0
    for b in batches:
        rows = float(b.keep.sum()) if b.keep is not None else float(b.completion_ids.shape[0])
        if aggregation == "token_mean":
            local += float(b.loss_mask.sum())
        elif aggregation == "seq_mean":
            local += rows
        else:  # dr_grpo
            local += rows * float(max_completion_length)
    return float(all_reduce(local)) if all_reduce is not None else local


def policy_loss(
    logp: torch.Tensor,
    batch: Batch,
    cfg: LossConfig,
    normalizer: float,
    ref_logp: torch.Tensor | None = None,
    *,
    entropy: torch.Tensor | None = None,
    max_completion_length: int | None = None,
) -> LossOutput:
    """Clipped surrogate + β·KL for one micro-batch, normalised by the global ``normalizer``.

    See the module docstring for the formulas.

    Args:
        logp: ``[P*G, Lc]`` log-probs of the completion tokens under the current policy (with grad), at the
            sampling temperature; values where ``batch.loss_mask`` is 0 are ignored.
        batch: The micro-batch: ``loss_mask`` ``[P*G, Lc]``, ``advantages`` ``[P*G]`` or ``[P*G, Lc]``,
            ``old_logp`` ``[P*G, Lc]`` (``None`` = on-policy, ``logp.detach()``), ``ref_logp``.
        cfg: ``epsilon_low``, ``epsilon_high``, ``beta``, ``aggregation`` (``token_mean`` | ``seq_mean`` |
            ``dr_grpo``); optional ``kl_bias_correction`` (default True, as TRL).
        normalizer: The global denominator from :func:`normalizer_for` (same value for every micro-batch
            of the optimizer step).
        ref_logp: ``[P*G, Lc]`` reference log-probs; defaults to ``batch.ref_logp``. Needed when β > 0.
        entropy: ``[P*G, Lc]`` next-token entropies (:func:`rltk.forward.completion_scores`); needed
            (differentiable) when ``entropy_coef > 0``, logged as ``loss/entropy_mean`` whenever given.
        max_completion_length: Accepted for call-site symmetry with :func:`normalizer_for` and not used:
            Dr. GRPO's ``max_completion_length`` is already a factor of ``normalizer``.

    Returns:
        The loss (this micro-batch's share of the full-batch loss) and its metrics.

    Raises:
        ValueError: On an unknown aggregation, ``normalizer <= 0``, β > 0 without reference log-probs, or
            ``entropy_coef > 0`` without entropies.

    """
    del max_completion_length  # already inside `normalizer`
    if cfg.aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {cfg.aggregation!r}; expected one of {AGGREGATIONS}")
    if normalizer <= 0:
        raise ValueError(f"normalizer must be > 0 (got {normalizer}); skip the update when it is 0")
    mask = batch.loss_mask.to(logp.dtype)  # [P*G, Lc]
    valid = mask > 0  # [P*G, Lc]
    old = batch.old_logp if batch.old_logp is not None else logp.detach()  # [P*G, Lc]
    # Masked positions get log-ratio 0 so that garbage there can never overflow exp() into inf·0 = NaN.
    log_ratio = torch.where(valid, logp - old, torch.zeros_like(logp))  # [P*G, Lc]
    per_token, ratio, adv = _surrogate(log_ratio, batch.advantages.to(logp.dtype), mask, cfg)
    tis_cap = float(getattr(cfg, "tis_cap", 0.0))
    if tis_cap > 0 and batch.sample_logp is not None:  # the sampler is not the trainer (vLLM, bf16)
        gap = torch.where(valid, old - batch.sample_logp, torch.zeros_like(old))  # [P*G, Lc]
        per_token = per_token * torch.exp(gap).clamp(max=tis_cap).detach()

    kl = None
    if cfg.beta != 0.0 and not getattr(cfg, "kl_in_reward", False):
        ref = ref_logp if ref_logp is not None else batch.ref_logp
        if ref is None:
            raise ValueError("beta > 0 needs reference log-probs (batch.ref_logp or ref_logp=)")
        delta = torch.where(valid, ref - logp, torch.zeros_like(logp))  # [P*G, Lc]
        kl = torch.exp(delta) - delta - 1  # [P*G, Lc] k3
        if getattr(cfg, "kl_bias_correction", True):
            kl = kl * torch.exp(log_ratio)
        per_token = per_token + cfg.beta * kl

    entropy_coef = float(getattr(cfg, "entropy_coef", 0.0))
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the entropies (completion_scores(..., entropy=True))")
        per_token = per_token - entropy_coef * torch.where(valid, entropy, torch.zeros_like(entropy))

    loss = aggregate(per_token, mask, cfg.aggregation, normalizer)
    metrics = _metrics(ratio, adv, mask, cfg, kl, entropy)
    approx_kl = (torch.exp(log_ratio) - 1 - log_ratio).detach() * mask  # [P*G, Lc] k3 of old vs now
    metrics["loss/approx_kl"] = float(approx_kl.sum() / mask.sum().clamp(min=1.0))
    metrics["loss/value"] = float(loss.detach())
    return LossOutput(loss=loss, metrics=metrics)


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, normalizer: float
) -> torch.Tensor:
    """A micro-batch's share of the step's loss from per-token terms ``[N, Lc]``.

    Summed as ``aggregation`` says (module docstring), over the step's global ``normalizer``.
    """
    if aggregation == "seq_mean":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [N]
        return per_seq.sum() / normalizer
    return (per_token * mask).sum() / normalizer  # token_mean, dr_grpo: a token sum over a global denominator


def value_loss(values: torch.Tensor, batch: Batch, cfg: LossConfig, normalizer: float) -> LossOutput:
    """PPO's clipped value loss on the model tokens, aggregated and normalised as the policy loss.

    ::

        V_clip = V_old + clip(V - V_old, -ε_v, ε_v)          # ε_v = cfg.value_clip
        ℓ^V_it = ½ · max((V_it - R_it)², (V_clip,it - R_it)²)   # R = the returns of the advantage stage

    Args:
        values: ``[P*G, Lc]`` the critic's values now (with grad).
        batch: ``loss_mask``, ``values`` (before the update) and ``returns``, all ``[P*G, Lc]``.
        cfg: ``value_clip`` and ``aggregation``.
        normalizer: The step's global denominator (:func:`normalizer_for`).

    Returns:
        The loss (times ``vf_coef`` by the caller) and ``value/loss``, ``value/clip_frac``, ``value/mean``.

    """
    if batch.values is None or batch.returns is None:
        raise ValueError(
            "the value loss needs the experience pass's values and the advantage stage's returns"
        )
    mask = batch.loss_mask.to(values.dtype)  # [P*G, Lc]
    old = batch.values
    clipped = old + (values - old).clamp(-cfg.value_clip, cfg.value_clip)  # [P*G, Lc]
    unclipped_sq, clipped_sq = (values - batch.returns) ** 2, (clipped - batch.returns) ** 2
    loss = aggregate(0.5 * torch.max(unclipped_sq, clipped_sq), mask, cfg.aggregation, normalizer)
    denom = mask.sum().clamp(min=1.0)
    metrics = {
        "value/loss": float(loss.detach()),
        "value/clip_frac": float(((clipped_sq > unclipped_sq).to(mask.dtype) * mask).sum() / denom),
        "value/mean": float((values.detach() * mask).sum() / denom),
    }
    return LossOutput(loss, metrics)


def _surrogate(
    log_ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate per token: ``(loss [N, Lc], ratio [N, Lc], advantage [N, Lc] | [N, 1])``.

    With ``cfg.ratio == "sequence"`` (TRL's RLOO) the ratio is the rollout's, ``exp(Σ_t log_ratio)``, and
    every token of the rollout carries its surrogate, so ``seq_mean`` gives exactly the per-rollout loss.
    """
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # [N, 1]
    if getattr(cfg, "ratio", "token") == "sequence":
        if adv.shape[1] != 1:
            raise ValueError(
                "ratio 'sequence' needs sequence-level advantages [N] (not a token-level estimator)"
            )
        ratio = torch.exp((log_ratio * mask).sum(-1, keepdim=True))  # [N, 1]
        clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
        per_seq = -torch.min(ratio * adv, clipped * adv)  # [N, 1]
        per_token = per_seq * mask  # [N, Lc]: every token carries its rollout's loss
        return per_token, ratio.expand_as(mask), adv
    ratio = torch.exp(log_ratio)  # [N, Lc]
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.epsilon_high)  # [N, Lc]
    return -torch.min(ratio * adv, clipped * adv), ratio, adv


@torch.no_grad()
def _metrics(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    cfg: LossConfig,
    kl: torch.Tensor | None,
    entropy: torch.Tensor | None,
) -> dict[str, float]:
    """Token means over the loss-mask tokens (see :class:`LossOutput`), and ``loss/tokens``."""
    n_tok = mask.sum()
    denom = n_tok.clamp(min=1.0)
    low = (ratio < 1 - cfg.epsilon_low) & (adv < 0)  # [N, Lc]
    high = (ratio > 1 + cfg.epsilon_high) & (adv > 0)  # [N, Lc]
    metrics = {
        "loss/clip_low_frac": float((low.to(mask.dtype) * mask).sum() / denom),
        "loss/clip_high_frac": float((high.to(mask.dtype) * mask).sum() / denom),
        "loss/clip_region_frac": float(((low | high).to(mask.dtype) * mask).sum() / denom),
        "loss/ratio_mean": float((ratio * mask).sum() / denom),
        "loss/tokens": float(n_tok),
    }
    if kl is not None:
        metrics["loss/kl_mean"] = float((kl * mask).sum() / denom)
    if entropy is not None:
        metrics["loss/entropy_mean"] = float((entropy.detach() * mask).sum() / denom)
    return metrics
