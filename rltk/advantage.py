"""Stage "advantage": turn each group's rewards into per-completion advantages.

An *estimator* maps one :class:`~rltk.batch.Group` (rewards already set by the reward stage) to its
advantages: ``[G]`` for sequence-level estimators (every token of completion ``i`` gets ``A_i``) or
``[G, L]`` for token-level ones. Estimators are registered in :data:`ESTIMATORS`; :func:`compute` picks one
by ``cfg.estimator`` (default ``"group_relative"``), applies DAPO's dynamic sampling and returns metrics.
PPO's GAE (token-level, needs a value head) will be one more entry in :data:`ESTIMATORS`.

Group-relative estimator (GRPO / Dr. GRPO / DAPO), for a group with rewards ``r_1..r_G``::

    mean = (1/G) Σ_j r_j
    std  = sqrt( Σ_j (r_j - mean)² / (G - 1) )        # unbiased (Bessel), as TRL's ``nanstd``
    A_i  = (r_i - mean) / (std + 1e-4)                 # scale_std=True  (GRPO, DAPO)
    A_i  =  r_i - mean                                 # scale_std=False (Dr. GRPO)

This is exactly TRL 1.16's ``GRPOTrainer`` with ``scale_rewards="group"`` / ``"none"`` and
``multi_objective_aggregation="sum_then_normalize"``: TRL's ``nanstd`` applies Bessel's correction, i.e. the
same value as ``torch.std(unbiased=True)`` (the torch default), and adds ``1e-4`` to the std, not to the
variance. Like TRL, a NaN reward is left out of the mean and std and its advantage is set to 0.

Dynamic sampling (DAPO): a group whose rewards all agree (``std ≈ 0``, ``torch.isclose(std, 0)`` as TRL's
``frac_reward_zero_std``) carries no learning signal, so it is dropped when ``cfg.dynamic_sampling``.
Without dynamic sampling it is kept with advantages ``≈ 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from rltk.batch import Group

STD_EPS = 1e-4
"""Added to the group std before dividing (TRL: ``advantages / (std_rewards + 1e-4)``)."""


class AdvantageConfig(Protocol):
    """What :func:`compute` reads from the config (``config.algorithm.resolved()`` satisfies it)."""

    scale_std: bool
    dynamic_sampling: bool


Estimator = Callable[[Group, AdvantageConfig], torch.Tensor]
"""``(group, cfg) -> advantages``: ``[G]`` (sequence-level) or ``[G, L]`` (token-level), float32."""


@dataclass
class AdvantageResult:
    """What the advantage stage hands on.

    Attributes:
        groups: The groups kept (all of them unless dynamic sampling dropped some), with ``advantages`` set.
        metrics: ``advantage/groups_dropped``, ``advantage/groups_kept``, ``advantage/mean_abs``
            (mean ``|A_i|`` over the kept completions), ``reward/group_std_mean`` (mean group reward std over
            all groups, before dropping), ``reward/frac_zero_std`` (fraction of groups with zero std).

    """

    groups: list[Group]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def groups_kept(self) -> list[Group]:
        """Alias of :attr:`groups` (the name used in docs/contracts.md)."""
        return self.groups


def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) std of a group's rewards, ignoring NaNs, as TRL's ``nanstd``.

    Args:
        rewards: ``[G]`` rewards; NaN marks a completion that could not be scored.

    Returns:
        A 0-dim float32 tensor ``sqrt(Σ (r - mean)² / (n - 1))`` over the ``n`` non-NaN rewards; NaN if
        ``n < 2``.

    """
    r = rewards.float()
    valid = ~torch.isnan(r)  # [G]
    n = valid.sum()
    mean = torch.nanmean(r)
    sq = torch.where(valid, (r - mean) ** 2, torch.zeros_like(r))  # [G]
    if n < 2:
        return torch.tensor(float("nan"))
    return torch.sqrt(sq.sum() / (n - 1))


def group_relative(group: Group, cfg: AdvantageConfig) -> torch.Tensor:
    """GRPO / Dr. GRPO advantages of one group (see the module docstring for the formulas).

    Args:
        group: A group whose rollouts have ``reward`` set.
        cfg: ``cfg.scale_std`` selects ``(r - mean) / (std + 1e-4)`` (True) or ``r - mean`` (False).

    Returns:
        ``[G]`` float32 advantages; 0 for NaN rewards.

    """
    rewards = group.rewards  # [G]
    adv = rewards - torch.nanmean(rewards)  # [G]
    if cfg.scale_std:
        adv = adv / (group_std(rewards) + STD_EPS)
    return torch.nan_to_num(adv, nan=0.0).to(torch.float32)  # [G]


ESTIMATORS: dict[str, Estimator] = {"group_relative": group_relative}
"""Advantage estimators by name; ``cfg.estimator`` (if the config has it) picks one."""


def compute(groups: list[Group], cfg: AdvantageConfig) -> AdvantageResult:
    """Set ``group.advantages`` on every group kept, dropping zero-variance groups under dynamic sampling.

    Args:
        groups: Groups with rewards set (``rollout.reward``).
        cfg: An object with ``scale_std: bool`` and ``dynamic_sampling: bool`` (e.g. the resolved
            ``AlgorithmView``); an optional ``estimator: str`` names an entry of :data:`ESTIMATORS`.

    Returns:
        The kept groups (same order, same objects, ``advantages`` set) and the stage's metrics. The list may
        be empty when dynamic sampling drops every group; the caller must then skip the update.

    Raises:
        KeyError: If ``cfg.estimator`` names no registered estimator.

    """
    name = getattr(cfg, "estimator", None) or "group_relative"
    if name not in ESTIMATORS:
        raise KeyError(f"unknown advantage estimator {name!r}; registered: {sorted(ESTIMATORS)}")
    estimator = ESTIMATORS[name]

    kept: list[Group] = []
    stds: list[float] = []
    n_zero_std = 0
    abs_sum, abs_count = 0.0, 0
    for group in groups:
        std = group_std(group.rewards)
        zero_std = bool(torch.isclose(std, torch.zeros_like(std))) or bool(torch.isnan(std))
        stds.append(0.0 if torch.isnan(std) else float(std))
        n_zero_std += zero_std
        if zero_std and cfg.dynamic_sampling:
            continue
        group.advantages = estimator(group, cfg)  # [G] or [G, L]
        kept.append(group)
        abs_sum += float(group.advantages.abs().sum())
        abs_count += group.advantages.numel()

    n = len(groups)
    metrics = {
        "advantage/groups_dropped": float(n - len(kept)),
        "advantage/groups_kept": float(len(kept)),
        "advantage/mean_abs": abs_sum / abs_count if abs_count else 0.0,
        "reward/group_std_mean": sum(stds) / n if n else 0.0,
        "reward/frac_zero_std": n_zero_std / n if n else 0.0,
    }
    return AdvantageResult(groups=kept, metrics=metrics)
