"""Prompts as a KV cache: the token prefix common to a batch's prompts once, then each prompt's own suffix.

Used by sampling (:mod:`rltk.rollout`: prefill, then ``generate`` continues from the cache) and by the
training forward (:mod:`rltk.forward`, mode ``"kv"``: prefill with grad, then the completions on top). Both
lay the P left-padded prompts out as ``prefix | pad | suffix`` (:func:`shared_prefix_layout`) and give every
real token the position ``generate`` gives it: ``cumsum(mask) - 1`` (:func:`prompt_positions`), so the
padding between prefix and suffix is skipped.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Cache

from rltk.net import as_net

MIN_SHARED_PREFIX = 16  # a shorter common prefix runs with each prompt (a separate pass is not worth it)


def prompt_positions(prompt_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of prompts, as ``generate`` computes them (``cumsum(mask) - 1``; padding is skipped).

    Args:
        prompt_mask: ``[P, Lp]`` 1 for real tokens; padding may sit left or between prefix and suffix (its
            positions are unused).

    Returns:
        ``[P, Lp]`` long tensor.

    """
    return (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)


def shared_prefix_length(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, min_length: int = MIN_SHARED_PREFIX
) -> int:
    """Length C of the token prefix common to all P prompts, or 0 where sharing it is not worth a pass.

    C is capped so that every prompt keeps at least one token of its own: the last prompt token's logits
    predict completion token 0 (and ``generate`` feeds that token itself).

    Args:
        prompt_ids: ``[P, Lp]`` left-padded prompts.
        prompt_mask: ``[P, Lp]`` 1 for real tokens.
        min_length: Shortest prefix worth sharing; a shorter one gives 0. P=1 also gives 0.

    Returns:
        C, in ``{0} ∪ [min_length, min_i len(prompt_i) - 1]``.

    """
    p, lp = prompt_ids.shape
    lengths = prompt_mask.long().sum(-1)  # [P]
    width = int(lengths.min()) - 1  # the most a prefix may take
    if p < 2 or width < max(min_length, 1):
        return 0
    cols = (lp - lengths)[:, None] + torch.arange(width, device=prompt_ids.device)  # [P, width]
    heads = prompt_ids.gather(1, cols)  # [P, width]: each prompt's first tokens
    same = (heads == heads[:1]).all(0)  # [width]
    c = int(same.long().cumprod(0).sum())
    return c if c >= min_length else 0


def shared_prefix_layout(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, prefix_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each left-padded prompt's padding to just after the shared prefix: ``prefix | pad | suffix``.

    The width stays Lp and each suffix stays where it was (right-aligned): row ``i``'s first
    ``pad_i + C`` columns are rotated left by ``pad_i``. ``prefix_len=0`` returns the inputs unchanged.

    Args:
        prompt_ids: ``[P, Lp]`` left-padded prompts sharing their first ``prefix_len`` tokens.
        prompt_mask: ``[P, Lp]`` 1 for real tokens.
        prefix_len: C (see :func:`shared_prefix_length`).

    Returns:
        ``(ids, mask)``, both ``[P, Lp]``; ``mask`` is 0 on the padding between prefix and suffix.

    """
    if prefix_len == 0:
        return prompt_ids, prompt_mask
    lp = prompt_ids.shape[1]
    pad = lp - prompt_mask.long().sum(-1, keepdim=True)  # [P, 1]
    col = torch.arange(lp, device=prompt_ids.device)[None]  # [1, Lp]
    src = torch.where(col < prefix_len, col + pad, torch.where(col < prefix_len + pad, col - prefix_len, col))
    return prompt_ids.gather(1, src), prompt_mask.gather(1, src)  # [P, Lp] each


def prefill(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, prefix_len: int
) -> tuple[torch.Tensor | None, Cache | None]:
    """Run P prompts into a KV cache: their shared prefix once, then their suffixes on top of it.

    The prefix ``[1, C]`` runs once and its cache is expanded P times (``batch_repeat_interleave``, so
    gradients of every suffix flow back to it); then the suffixes ``[P, L-C]`` run with the attention mask
    ``[P, L]`` and position ids continuing from C. Runs with grad if grad is enabled.

    Args:
        model: A causal LM (transformers, optionally peft-wrapped) or a (DDP-wrapped)
            :class:`~rltk.net.PolicyNet`: only its trunk runs.
        ids: ``[P, L]`` prompts in :func:`shared_prefix_layout` (plainly left-padded if ``prefix_len`` is 0).
        mask: ``[P, L]`` 1 for real tokens.
        prefix_len: C, the shared prefix length (``ids[:, :C]`` are equal rows, all real tokens).

    Returns:
        ``(hidden, cache)``: ``[P, 1, H]`` hidden states at the last position (they predict the first
        completion token) and the cache of all L positions (batch P); ``(None, None)`` if L is 0.

    """
    p, length = ids.shape
    if length == 0:
        return None, None
    net = as_net(model)
    positions = prompt_positions(mask)  # [P, L]
    hidden = cache = None
    if prefix_len:
        hidden, cache = net(
            input_ids=ids[:1, :prefix_len],
            attention_mask=mask[:1, :prefix_len],
            position_ids=positions[:1, :prefix_len],
            use_cache=True,
        )
        hidden = hidden[:, -1:].expand(p, -1, -1)  # [P, 1, H]
        cache.batch_repeat_interleave(p)  # [1, ...] -> [P, ...], differentiable
    if length > prefix_len:
        hidden, cache = net(
            input_ids=ids[:, prefix_len:],  # [P, S]
            attention_mask=mask,  # [P, C + S]
            position_ids=positions[:, prefix_len:],  # [P, S]
            cache=cache,
            use_cache=True,
        )
        hidden = hidden[:, -1:]  # [P, 1, H]
    return hidden, cache
