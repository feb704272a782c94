"""Stage "selection": which of a step's groups it learns from, before the experience pass.

    groups ──select──▶ kept ──collate, experience pass──▶ micro-batches ──advantage.assign──▶ advantages

A group that failures (a reward or the env failed: NaN reward) left with fewer scored rollouts than the
estimator compares (2 for a grouped one, 1 for GAE) is dropped: nothing in it can be learned from.

Dynamic sampling (DAPO): a group whose rewards all agree (``std ≈ 0``, ``torch.isclose(std, 0)`` as TRL's
``frac_reward_zero_std``) carries no learning signal, so it is dropped when ``cfg.dynamic_sampling``.
Without dynamic sampling it is kept with advantages ``≈ 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rltk.advantage import GROUPED, AdvantageConfig, group_std
from rltk.batch import Group


@dataclass
class Selection:
    """The groups a step learns from, and why the others were dropped.

    Attributes:
        groups: The kept groups, in order.
        metrics: ``advantage/groups_dropped`` (for any reason), ``advantage/groups_failed`` (fewer than 2
            scored rollouts left after failures, or none for an ungrouped estimator),
            ``advantage/groups_kept``, ``reward/group_std_mean`` (mean group reward std over the groups
            with 2 or more scored rollouts, before dynamic sampling), ``reward/frac_zero_std`` (the
            fraction of those with zero std).

    """

    groups: list[Group]
    metrics: dict[str, float] = field(default_factory=dict)


def select(groups: list[Group], cfg: AdvantageConfig) -> Selection:
    """Keep the groups with scored rollouts to learn from; under dynamic sampling, only those that vary.

    A grouped estimator needs 2 scored rollouts per group, GAE one. The result may be empty (every group
    dropped): the caller then skips the update.
    """
    least = 2 if cfg.estimator in GROUPED else 1
    kept: list[Group] = []
    stds: list[float] = []
    n_zero_std = n_failed = 0
    for group in groups:
        scored = int((~torch.isnan(group.rewards)).sum())
        if scored < least:  # failures left no pair to compare (or nothing at all)
            n_failed += 1
            continue
        zero_std = False
        if scored >= 2:
            std = group_std(group.rewards)
            zero_std = bool(torch.isclose(std, torch.zeros_like(std)))
            stds.append(float(std))
            n_zero_std += zero_std
        if not (zero_std and cfg.dynamic_sampling):
            kept.append(group)
    metrics = {
        "advantage/groups_dropped": float(len(groups) - len(kept)),
        "advantage/groups_failed": float(n_failed),
        "advantage/groups_kept": float(len(kept)),
        "reward/group_std_mean": sum(stds) / len(stds) if stds else 0.0,
        "reward/frac_zero_std": n_zero_std / len(stds) if stds else 0.0,
    }
    return Selection(kept, metrics)
