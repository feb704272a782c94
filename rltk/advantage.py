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

Failed rollouts (a reward or the env failed, :class:`rltk.batch.Failure`) carry a NaN reward: every estimator
computes over the rollouts that remain, gives the failed ones advantage 0, and a group left with fewer than 2
is dropped (``advantage/groups_failed``), as if the failed rollouts had never been sampled.

Dynamic sampling (DAPO): a group whose rewards all agree (``std ≈ 0``, ``torch.isclose(std, 0)`` as TRL's
``frac_reward_zero_std``) carries no learning signal, so it is dropped when ``cfg.dynamic_sampling``.
Without dynamic sampling it is kept with advantages ``≈ 0``.

Answer balancing (``cfg.balance_answers``), for tasks whose answers fall in a few classes (a decision, a
label). With advantages summing to 0 in every group, the push of a batch on the *prior* of answer class ``c``
(a shift of its logit on every prompt) is ``S_c = Σ_{i: answer_i = c} A_i``. Balancing replaces the advantage
vector ``A`` (all kept completions, ``[N]``) by the nearest one (L2) with equal ``S_c`` for the valid classes
``c_1..c_m`` seen in the batch, keeping every group's sum at 0::

    w_j = 1[answer = c_j] - 1[answer = c_1], centred within each group       # [N], j = 2..m
    A  <- A - W (WᵀW)⁺ Wᵀ A                                                # W = [w_2 .. w_m]  [N, m-1]

What is left is contrastive: a class is raised on the prompts where it was right *against* the prompts
where it was wrong, which moves the features that tell them apart and not the class prior. Meant for a
model that barely separates the classes, where a prior pushed to one answer is absorbing (groups that all
agree have zero advantage). It removes only the first-order push: on the quickstart the prior still swung
(``docs/rl_findings.md``). The class is the env verdict's ``"answer"`` key
(``Env.check``). A completion without one (unparseable) is in no column: malformed answers are still pushed
down against the valid ones. Not for tasks whose right answer is mostly one class: there the prior should
move.
"""

from __future__ import annotations

import math
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
    balance_answers: bool


Estimator = Callable[[Group, AdvantageConfig], torch.Tensor]
"""``(group, cfg) -> advantages``: ``[G]`` (sequence-level) or ``[G, L]`` (token-level), float32."""


@dataclass
class AdvantageResult:
    """What the advantage stage hands on.

    Attributes:
        groups: The groups kept (all of them unless dynamic sampling dropped some), with ``advantages`` set.
        metrics: ``advantage/groups_dropped`` (for any reason), ``advantage/groups_failed`` (fewer than 2
            rollouts left after failures), ``advantage/groups_kept``, ``advantage/mean_abs``
            (mean ``|A_i|`` over the kept completions), ``reward/group_std_mean`` (mean group reward std over
            the groups with 2 or more scored rollouts, before dynamic sampling), ``reward/frac_zero_std``
            (the fraction of those with zero std).

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


def balance_answers(groups: list[Group]) -> float:
    """Project sequence-level advantages in place so every answer class gets the same net push (module doc).

    Args:
        groups: Groups with ``[G]`` advantages set; a rollout's class is ``rollout.outcome.get("answer")``.

    Returns:
        The fraction of ``|A|²`` the projection removed (0 = the batch was already balanced).

    >>> from rltk.batch import Rollout
    >>> def group(answers, advantages):
    ...     rollouts = [Rollout(None, [], *[torch.zeros(0)] * 3, outcome={"answer": a}) for a in answers]
    ...     return Group(None, torch.zeros(0), rollouts, torch.tensor(advantages))
    >>> gs = [group(["FLAG", "CLEAR"], [1.0, -1.0]), group(["FLAG", "CLEAR"], [-0.5, 0.5])]
    >>> round(balance_answers(gs), 4)
    0.1
    >>> [g.advantages.tolist() for g in gs]
    [[0.75, -0.75], [-0.75, 0.75]]

    """
    if not groups:
        return 0.0
    if any(g.advantages is None or g.advantages.dim() != 1 for g in groups):
        raise ValueError("balance_answers needs sequence-level [G] advantages on every group")
    # A failed rollout (NaN reward) is not in the batch as far as the estimate goes: leave it out entirely.
    kept = [[i for i, r in enumerate(g.rollouts) if not math.isnan(r.reward)] for g in groups]
    answers = [g.rollouts[i].outcome.get("answer") for g, idx in zip(groups, kept, strict=True) for i in idx]
    classes = sorted({a for a in answers if a is not None}, key=str)
    adv = torch.cat([g.advantages.double()[idx] for g, idx in zip(groups, kept, strict=True)])  # [N]
    if len(classes) < 2 or not float(adv.norm()):
        return 0.0
    onehot = torch.tensor([[a == c for c in classes] for a in answers], dtype=torch.float64)  # [N, m]
    w = onehot[:, 1:] - onehot[:, :1]  # [N, m-1]
    sizes = [len(idx) for idx in kept]
    w = torch.cat([block - block.mean(0, keepdim=True) for block in w.split(sizes)])  # centred per group
    fix = w @ (torch.linalg.pinv(w.T @ w) @ (w.T @ adv))  # [N] the component along the class priors
    for g, idx, part in zip(groups, kept, (adv - fix).split(sizes), strict=True):
        advantages = torch.zeros(len(g.rollouts), dtype=torch.float32)  # [G]
        advantages[idx] = part.to(torch.float32)
        g.advantages = advantages
    return float(fix.norm() ** 2 / adv.norm() ** 2)


def max_likelihood(group: Group, cfg: AdvantageConfig) -> torch.Tensor:
    """MaxRL advantages ``(r_i - mean) / mean`` of one group (module docstring).

    Args:
        group: A group whose rollouts have ``reward`` set, each in ``[0, 1]`` (NaN = unscored).
        cfg: Unused (the estimator has no options).

    Returns:
        ``[G]`` float32 advantages; all -1 when no completion succeeded (``mean <= 1e-6``); 0 for NaN rewards.

    Raises:
        ValueError: If a reward lies outside ``[0, 1]``.

    >>> from rltk.batch import Rollout
    >>> rollouts = [Rollout(None, [], *[torch.zeros(0)] * 3, reward=r) for r in (1, 0, 0, 0)]
    >>> g = Group(None, torch.zeros(0), rollouts)
    >>> max_likelihood(g, None).tolist()
    [3.0, -1.0, -1.0, -1.0]

    """
    rewards = group.rewards  # [G]
    valid = rewards[~torch.isnan(rewards)]
    if bool(((valid < 0) | (valid > 1)).any()):
        raise ValueError(
            f"algorithm 'maxrl' needs success rewards in [0, 1], got {valid.tolist()}; "
            "use reward weights that sum to 1 and rewards scored in [0, 1], or algorithm.name=grpo"
        )
    mean = torch.nanmean(rewards)
    no_success = not float(mean) > 1e-6
    adv = torch.full_like(rewards, -1.0) if no_success else rewards / mean - 1.0  # [G]
    return torch.where(torch.isnan(rewards), torch.zeros_like(adv), adv).to(torch.float32)  # [G]


ESTIMATORS: dict[str, Estimator] = {"group_relative": group_relative, "max_likelihood": max_likelihood}
"""Advantage estimators by name; ``cfg.estimator`` (if the config has it) picks one."""


def compute(groups: list[Group], cfg: AdvantageConfig) -> AdvantageResult:
    """Set ``group.advantages`` on every group kept, dropping zero-variance groups under dynamic sampling.

    Args:
        groups: Groups with rewards set (``rollout.reward``).
        cfg: An object with ``scale_std: bool`` and ``dynamic_sampling: bool`` (e.g. the resolved
            ``AlgorithmView``); an optional ``estimator: str`` names an entry of :data:`ESTIMATORS`, and an
            optional ``balance_answers: bool`` applies :func:`balance_answers` to the kept groups.

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
    n_zero_std = n_failed = 0
    for group in groups:
        if int((~torch.isnan(group.rewards)).sum()) < 2:  # failures left no pair to compare
            n_failed += 1
            continue
        std = group_std(group.rewards)
        zero_std = bool(torch.isclose(std, torch.zeros_like(std))) or bool(torch.isnan(std))
        stds.append(0.0 if torch.isnan(std) else float(std))
        n_zero_std += zero_std
        if zero_std and cfg.dynamic_sampling:
            continue
        group.advantages = estimator(group, cfg)  # [G] or [G, L]
        kept.append(group)

    removed = balance_answers(kept) if getattr(cfg, "balance_answers", False) else 0.0
    abs_sum = sum(float(g.advantages.abs().sum()) for g in kept)
    abs_count = sum(g.advantages.numel() for g in kept)
    n = len(groups)
    metrics = {
        "advantage/balance_removed": removed,
        "advantage/groups_dropped": float(n - len(kept)),
        "advantage/groups_failed": float(n_failed),
        "advantage/groups_kept": float(len(kept)),
        "advantage/mean_abs": abs_sum / abs_count if abs_count else 0.0,
        "reward/group_std_mean": sum(stds) / len(stds) if stds else 0.0,
        "reward/frac_zero_std": n_zero_std / len(stds) if stds else 0.0,
    }
    return AdvantageResult(groups=kept, metrics=metrics)
