"""Answer balancing (``algorithm.balance_answers``): a step's advantages with no net push on any answer prior.

For tasks whose answers fall in a few classes (a decision, a label). With advantages summing to 0 in every
group, the push of a batch on the *prior* of answer class ``c`` (a shift of its logit on every prompt) is
``S_c = Σ_{i: answer_i = c} A_i``. Balancing replaces the advantage vector ``A`` (all kept completions,
``[N]``) by the nearest one (L2) with equal ``S_c`` for the valid classes ``c_1..c_m`` seen in the batch,
keeping every group's sum at 0::

    w_j = 1[answer = c_j] - 1[answer = c_1], centred within each group       # [N], j = 2..m
    A  <- A - W (WᵀW)⁺ Wᵀ A                                                # W = [w_2 .. w_m]  [N, m-1]

What is left is contrastive: a class is raised on the prompts where it was right *against* the prompts where
it was wrong, which moves the features that tell them apart and not the class prior. Meant for a model that
barely separates the classes, where a prior pushed to one answer is absorbing (groups that all agree have zero
advantage). It removes only the first-order push: on the quickstart the prior still swung
(``docs/rl_findings.md``). The class is the env verdict's ``answer`` (``Env.check``). A completion without one
(unparseable) is in no column: malformed answers are still pushed down against the valid ones. Not for tasks
whose right answer is mostly one class: there the prior should move.

:func:`rltk.advantage.assign` applies it to the whole step after the estimator (sequence-level only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def balance_answers(
    adv: torch.Tensor, answers: Sequence[Any], group_size: int, scored: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Project sequence-level advantages so every answer class gets the same net push (module docstring).

    Args:
        adv: ``[N]`` advantages, groups summing to 0 (G consecutive rows per task).
        answers: N answer classes (``outcome["answer"]``; ``None`` = unparseable, in no class).
        group_size: G.
        scored: ``[N]`` False for failed rollouts (left out entirely, advantage 0).

    Returns:
        The balanced ``[N]`` advantages and the fraction of ``|A|²`` the projection removed.

    >>> adv = torch.tensor([1.0, -1.0, -0.5, 0.5])
    >>> new, removed = balance_answers(adv, ["FLAG", "CLEAR"] * 2, 2, torch.ones(4, dtype=torch.bool))
    >>> new.tolist(), round(removed, 4)
    ([0.75, -0.75, -0.75, 0.75], 0.1)

    """
    keep = scored.nonzero().squeeze(-1)  # [K]
    a = adv.double()[keep]  # [K]
    kept_answers = [answers[i] for i in keep.tolist()]
    classes = sorted({x for x in kept_answers if x is not None}, key=str)
    if len(classes) < 2 or not float(a.norm()):
        return adv, 0.0
    onehot = torch.tensor([[x == c for c in classes] for x in kept_answers], dtype=torch.float64)  # [K, m]
    w = onehot[:, 1:] - onehot[:, :1]  # [K, m-1]
    group = keep // group_size  # [K]
    sums = torch.zeros(int(group.max()) + 1, w.shape[1], dtype=torch.float64).index_add_(0, group, w)
    counts = torch.bincount(group).double()[:, None]
    w = w - (sums / counts.clamp(min=1))[group]  # centred within each group
    fix = w @ (torch.linalg.pinv(w.T @ w) @ (w.T @ a))  # [K] the component along the class priors
    out = torch.zeros_like(adv)
    out[keep] = (a - fix).to(adv.dtype)
    return out, float(fix.norm() ** 2 / a.norm() ** 2)
