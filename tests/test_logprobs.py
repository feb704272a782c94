"""Chunked log-probs and entropies equal the full log-softmax, values and gradients, at any chunk size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rltk.logprobs import token_scores

N, L, H, V = 3, 5, 8, 40


def _inputs(seed: int = 0) -> tuple[torch.Tensor, nn.Linear, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, L, H, generator=gen, requires_grad=True)
    head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen))
    targets = torch.randint(0, V, (N, L), generator=gen)
    mask = torch.ones(N, L, dtype=torch.long)
    mask[0, 3:] = 0  # padding
    mask[2, 1] = 0  # an env token inside a completion
    return hidden, head, targets, mask


def _reference(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = (head(hidden).float() / temperature).log_softmax(-1)  # [N, L, V]
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1) * mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    return logp, entropy


@pytest.mark.parametrize("chunk", [1, 4, 512])
def test_values_and_gradients_equal_the_full_log_softmax(chunk: int) -> None:
    hidden, head, targets, mask = _inputs()
    scores = token_scores(
        hidden, head, targets, mask, 0.7, entropy=True, entropy_grad=True, chunk_tokens=chunk
    )
    logp, entropy = _reference(hidden, head, targets, mask, 0.7)
    torch.testing.assert_close(scores.logp, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores.entropy, entropy, atol=1e-5, rtol=1e-5)
    assert (scores.logp[mask == 0] == 0).all() and (scores.entropy[mask == 0] == 0).all()

    weights = torch.randn(N, L)
    grads = torch.autograd.grad((scores.logp * weights + scores.entropy).sum(), [hidden, head.weight])
    expected = torch.autograd.grad((logp * weights + entropy).sum(), [hidden, head.weight])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_entropy_without_grad_is_detached_and_no_grad_mode_keeps_no_graph() -> None:
    hidden, head, targets, mask = _inputs()
    scores = token_scores(hidden, head, targets, mask, entropy=True)
    assert scores.logp.requires_grad and not scores.entropy.requires_grad
    with torch.no_grad():
        plain = token_scores(hidden, head, targets, mask)
    assert not plain.logp.requires_grad and plain.entropy is None
    torch.testing.assert_close(plain.logp, scores.logp.detach())


def test_nothing_to_score() -> None:
    hidden, head, targets, mask = _inputs()
    scores = token_scores(hidden, head, targets, torch.zeros_like(mask), entropy=True)
    assert scores.logp.shape == (N, L) and not scores.logp.any() and not scores.entropy.any()
