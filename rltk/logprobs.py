"""Log-probs of chosen tokens and entropies from hidden states, without a batch's logits in memory at once.

For each scored position (``mask`` 1), with ``z = head(h) / T`` (fp32) over the vocabulary::

    log π(y) = z_y - logsumexp(z)
    H(π)     = logsumexp(z) - Σ_v softmax(z)_v · z_v             # = -Σ_v π_v log π_v

A batch's logits ``[N, Lc, V]`` (N·Lc = 10,000 positions of a multi-turn step times V = 49,152 in fp32:
2 GB, with as much again for the log-softmax and each of their gradients) never exist whole: the head runs
on ``chunk_tokens`` positions at a time, and under autograd each chunk is checkpointed
(``torch.utils.checkpoint``) so that only its two ``[chunk]`` outputs are kept and the backward pass
recomputes that chunk's logits. TRL's ``selective_log_softmax`` computes the same values from full
logits; this is the chunked form of its idea, with the head inside the chunk. Padding and env tokens
(``mask`` 0) are never scored: they get 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 512
"""Positions per chunk: a ``[512, 49152]`` fp32 block is 100 MB, and a matmul this size runs at full speed."""


@dataclass
class TokenScores:
    """Per completion token: log-prob of the sampled token and entropy of the whole next-token distribution.

    Attributes:
        logp: ``[N, L]`` fp32 log-probs (0 where the mask is 0), differentiable.
        entropy: ``[N, L]`` fp32 ``H(softmax(logits / T))`` (0 where masked); differentiable only when
            asked for with ``entropy_grad=True``, else detached (a metric). ``None`` unless asked for.
        values: ``[N, L]`` a critic's values (:func:`rltk.forward.completion_scores` with a value head).

    """

    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None


def _chunk_scores(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[c]`` of ``targets`` and entropies ``[c]`` (zeros unless ``entropy``) of one chunk."""
    z = head(hidden).float() / temperature  # [c, V]
    lse = z.logsumexp(-1)  # [c]
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse  # [c]
    if not entropy:
        return logp, torch.zeros_like(logp)
    probs = (z - lse[:, None]).exp()  # [c, V]
    return logp, lse - (probs * z).sum(-1)  # [c], [c]


def token_scores(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    *,
    entropy: bool = False,
    entropy_grad: bool = False,
    chunk_tokens: int = CHUNK_TOKENS,
) -> TokenScores:
    """Log-prob of ``targets`` under ``softmax(head(hidden) / temperature)``, and optionally entropies.

    Args:
        hidden: ``[N, L, H]`` the trunk's final hidden states; position ``t`` predicts ``targets[:, t]``.
        head: The output head, hidden ``[c, H]`` → logits ``[c, V]``.
        targets: ``[N, L]`` the token ids to score.
        mask: ``[N, L]`` 1 where to score; elsewhere the outputs are 0 and no head runs.
        temperature: The sampling temperature (> 0).
        entropy: Also return each scored position's entropy.
        entropy_grad: Keep the entropy differentiable (an entropy bonus); else it is detached.
        chunk_tokens: Positions per head call.

    Returns:
        :class:`TokenScores` with ``[N, L]`` fp32 tensors.

    >>> head = nn.Linear(2, 3, bias=False)
    >>> with torch.no_grad():
    ...     _ = head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    >>> hidden = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # [1, 2, 2]
    >>> s = token_scores(hidden, head, torch.tensor([[0, 2]]), torch.tensor([[1, 0]]), entropy=True)
    >>> round(s.logp[0, 0].item(), 4), s.logp[0, 1].item()  # 2 - log(e² + 2); the masked position: 0
    (-0.2395, 0.0)

    """
    where = mask.bool()  # [N, L]
    h = hidden[where]  # [T, H]
    ids = targets[where]  # [T]
    track = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    logps, entropies = [], []
    for hc, ic in zip(h.split(chunk_tokens), ids.split(chunk_tokens), strict=True):
        args = (head, hc, ic, temperature, entropy)
        lp, ent = checkpoint(_chunk_scores, *args, use_reentrant=False) if track else _chunk_scores(*args)
        logps.append(lp)
        entropies.append(ent)
    zeros = torch.zeros(where.shape, dtype=torch.float32, device=hidden.device)  # [N, L]
    if not logps:
        return TokenScores(zeros, zeros.clone() if entropy else None)
    scores = TokenScores(zeros.masked_scatter(where, torch.cat(logps)))
    if entropy:
        ent = torch.cat(entropies)
        scores.entropy = zeros.masked_scatter(where, ent if entropy_grad else ent.detach())
    return scores
