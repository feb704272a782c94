"""Stage "forward": log-probs of the sampled completions under the current policy (with autograd).

A GRPO batch holds P prompts with G completions each. The plain forward (TRL's, ``mode="off"``) runs every
row as prompt + completion, so each prompt is processed G times: ``P·G·(Lp+Lc)`` tokens. The shared-prompt
forward (the Prefix Grouper idea) processes each prompt once: ``P·(Lp+G·Lc)`` tokens. With P=4, G=8, Lp=130,
Lc=8 that is 4,416 vs 776 tokens, 5.7x fewer; the saving grows with G and with Lp/Lc.

Mode ``"kv"`` adds a second level: the P prompts of a batch usually share a long token prefix C (system
prompt, written policy, schema), which it runs once: ``C + P·(Lp-C) + P·G·Lc`` tokens. With P=8, G=8,
Lp=158, C=110, Lc=6 that is 10,496 (plain) vs 1,648 (per group) vs 878 (shared prefix) tokens.

Two exact implementations of the shared-prompt forward (identical to ``"off"`` up to float rounding, with
identical gradients, since the prompt's activations feed every completion through the attention):

* ``"kv"``: find the prefix common to all P prompts (:func:`rltk.prefix.shared_prefix_length`; 0 below
  ``MIN_SHARED_PREFIX`` tokens or for P=1) and move each prompt's left padding between that prefix and the
  prompt's own suffix (:func:`rltk.prefix.shared_prefix_layout`). :func:`rltk.prefix.prefill` runs the
  prefix ``[1, C]`` once (with grad, ``use_cache=True``), expands its KV cache P times, and runs the P
  suffixes on top of it; the last prompt position's hidden state predicts completion token 0. Then the G
  completions of each prompt run as ONE row
  ``c_1[:-1] | ... | c_G[:-1]`` on top of the prompt's cache, with the completion rows of the packed block
  mask (:func:`packed_attention_mask`: a completion token sees its prompt and its own earlier tokens) and
  position ids continuing from each prompt's length; the cache is never copied G times (the G-fold copy
  and its gradient were the largest items of a profiled CPU step). The prefix cache expansion uses
  ``batch_repeat_interleave`` (a differentiable ``repeat_interleave``), so the gradients of all P prompts
  flow back into the prefix's keys and values. With C=0 this is the per-group forward: the P left-padded
  prompts, then the completions. Transformers drops the ``cache`` argument under gradient checkpointing, so
  this mode refuses it. Long completions (``Lc-1 >= SEPARATE_ROWS_FROM``, i.e. multi-turn episodes) run
  one row each instead, on a G-fold copy of the prompt's cache: the packed row's attention grows as
  ``G·Lc·(Lp+G·Lc)``, the separate rows' as ``G·Lc·(Lp+Lc)``. Measured on SmolLM2-135M with LoRA, P=1,
  G=8, Lp=337, 2 CPU threads: Lc=322 takes 41 s (one row) vs 19 s (separate rows); Lc=64 6.6 vs 6.2 s;
  Lc=16 3.7 vs 4.7 s (``benchmarks/forward_tokens.py --modes kv-row,kv-rows``).
* ``"packed"``: one row per group, ``prompt | c_1 | ... | c_G``, with a 4D block attention mask: a completion
  token attends to its own (unpadded) prompt and to the earlier tokens of its own completion only, and its
  position ids restart at the prompt length. One ordinary forward, so gradient checkpointing works. The mask
  is boolean for SDPA and additive float for eager attention (transformers uses a 4D mask as-is). It shares
  the prompt per group only, not the prefix across groups.

Every mode runs the model's trunk only (:class:`rltk.net.PolicyNet`) and feeds a completion's last token
nowhere (nothing is predicted from it); :func:`rltk.logprobs.token_scores` then applies the output head to
the positions that predict model tokens (``loss_mask``), a chunk at a time, with the log-softmax in fp32.
Positions follow ``generate``: ``cumsum(mask) - 1`` over the prompt (so padding between a shared prefix and a
suffix is skipped), then ``len(prompt) + t``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from rltk.batch import Batch
from rltk.logprobs import TokenScores
from rltk.net import as_net, unwrap_net
from rltk.prefix import (
    MIN_SHARED_PREFIX,
    prefill,
    prompt_positions,
    shared_prefix_layout,
    shared_prefix_length,
)

Mode = Literal["off", "kv", "packed"]
MODES: tuple[Mode, ...] = ("off", "kv", "packed")
SEPARATE_ROWS_FROM = 48  # completions of at least this many tokens (less one) run one row each in "kv"


def completion_positions(prompt_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids of the completion tokens that follow each prompt: ``len(prompt) + t``.

    Args:
        prompt_mask: ``[P, Lp]`` 1 for real tokens.
        length: The number of completion positions ``Lc``.

    Returns:
        ``[P, Lc]`` long tensor.

    """
    prompt_len = prompt_mask.long().sum(-1, keepdim=True)  # [P, 1]
    return prompt_len + torch.arange(length, device=prompt_mask.device)  # [P, Lc]


def checkpointing_active(model: nn.Module) -> bool:
    """Return True if gradient checkpointing is on and in effect (train mode): the cache gets dropped."""
    return any(getattr(m, "gradient_checkpointing", False) and m.training for m in model.modules())


def completion_logprobs(
    model: nn.Module, batch: Batch, temperature: float = 1.0, mode: Mode = "kv"
) -> torch.Tensor:
    """``[P*G, Lc]`` log-probs of the completion tokens at temperature T (see :func:`completion_scores`)."""
    return completion_scores(model, batch, temperature, mode).logp


def completion_scores(
    model: nn.Module,
    batch: Batch,
    temperature: float = 1.0,
    mode: Mode = "kv",
    *,
    entropy: bool = False,
    entropy_grad: bool = False,
    value_head: nn.Module | None = None,
) -> TokenScores:
    """Log-prob of each completion token under ``softmax(logits / temperature)``, and optionally entropies.

    Args:
        model: A causal LM (transformers, optionally peft-wrapped) on the batch's device.
        batch: P prompts (left-padded) with G completions each (right-padded).
        temperature: The sampling temperature (> 0).
        mode: ``"kv"`` or ``"packed"`` (prompt once per group) or ``"off"`` (plain forward, the reference).
        entropy: Also return the entropy of each next-token distribution (over the whole vocabulary).
        entropy_grad: Keep the entropy differentiable (for an entropy bonus in the loss).
        value_head: A critic on the trunk (:class:`~rltk.net.ValueHead`): also return ``values``
            ``[P*G, Lc]``, the value of the state before each token (0 where ``loss_mask`` is 0).

    Returns:
        :class:`~rltk.logprobs.TokenScores`: ``[P*G, Lc]`` fp32 log-probs, 0 where ``loss_mask`` is 0,
        differentiable w.r.t. the model; entropies if asked for.

    Raises:
        ValueError: For an unknown mode, a bad temperature, inconsistent batch shapes, ``"kv"`` under
            gradient checkpointing, or ``"packed"`` with an attention implementation that cannot take a
            custom 4D mask.

    """
    if mode not in MODES:
        raise ValueError(f"unknown shared-prompt mode {mode!r}; use one of {list(MODES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p, g = batch.num_prompts, batch.group_size
    if batch.completion_ids.shape[0] != p * g:
        raise ValueError(
            f"batch has {batch.completion_ids.shape[0]} completion rows, expected P*G = {p}*{g} = {p * g}"
        )
    net = as_net(model)
    hidden = {"off": _hidden_plain, "kv": _hidden_kv, "packed": _hidden_packed}[mode](
        net, batch
    )  # [N, Lc, H]
    score = {
        "hidden": hidden,
        "targets": batch.completion_ids,
        "mask": batch.loss_mask,
        "temperature": temperature,
        "entropy": entropy,
        "entropy_grad": entropy_grad,
    }
    scores = net(score=score)
    if value_head is not None:
        scores.values = value_head(hidden) * batch.loss_mask  # [N, Lc]
    return scores


def _hidden_plain(net: nn.Module, batch: Batch) -> torch.Tensor:
    """``mode="off"``: every row is its prompt + completion. Returns ``[P*G, Lc, H]`` hidden states."""
    g, lc = batch.group_size, batch.completion_ids.shape[1]
    prompt_ids = batch.prompt_ids.repeat_interleave(g, 0)  # [N, Lp]
    prompt_mask = batch.prompt_mask.repeat_interleave(g, 0)  # [N, Lp]
    ids = torch.cat([prompt_ids, batch.completion_ids[:, :-1]], dim=1)  # [N, Lp+Lc-1]
    mask = torch.cat([prompt_mask, batch.completion_mask[:, :-1]], dim=1)  # [N, Lp+Lc-1]
    positions = torch.cat(
        [prompt_positions(prompt_mask), completion_positions(prompt_mask, lc)[:, :-1]], dim=1
    )  # [N, Lp+Lc-1]
    hidden, _ = net(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return hidden[:, -lc:]  # [N, Lc, H]: position Lp-1+t predicts completion token t


def _hidden_kv(net: nn.Module, batch: Batch) -> torch.Tensor:
    """``mode="kv"``: shared prefix once, each prompt once, KV expanded G times. Returns ``[P*G, Lc, H]``."""
    if checkpointing_active(net):
        raise ValueError(
            "shared-prompt mode 'kv' cannot run with gradient checkpointing: transformers drops "
            "the KV cache under checkpointing, which would silently detach the completions from their "
            "prompts. Use shared_prompt: packed (works with checkpointing), or disable gradient "
            "checkpointing."
        )
    p, g, lc = batch.num_prompts, batch.group_size, batch.completion_ids.shape[1]
    c = shared_prefix_length(batch.prompt_ids, batch.prompt_mask, MIN_SHARED_PREFIX)
    ids, mask = shared_prefix_layout(batch.prompt_ids, batch.prompt_mask, c)  # [P, Lp]: prefix | pad | suffix
    last, cache = prefill(net, ids, mask, c)  # [P, 1, H], cache of batch P
    first = last.repeat_interleave(g, 0)  # [N, 1, H]: predicts completion token 0
    if lc == 1:
        return first
    if lc - 1 >= SEPARATE_ROWS_FROM:
        # Long completions (multi-turn episodes): one row per completion on a G-fold copy of the prompt's
        # cache. Attention costs G·(Lc-1)·(Lp+Lc-1) here against G·(Lc-1)·(Lp+G·(Lc-1)) in one packed row.
        cache.batch_repeat_interleave(g)  # [P, ...] -> [P*G, ...], differentiable
        attention = torch.cat(
            [mask.repeat_interleave(g, 0), batch.completion_mask[:, :-1]], dim=1
        )  # [N, Lp+Lc-1]: prompt (prefix | pad | suffix), then the completion (right-padded)
        rest, _ = net(
            input_ids=batch.completion_ids[:, :-1],  # [N, Lc-1]
            attention_mask=attention,
            position_ids=completion_positions(batch.prompt_mask, lc)[:, :-1].repeat_interleave(g, 0),
            cache=cache,
            use_cache=True,
        )  # [N, Lc-1, H]
        return torch.cat([first, rest], dim=1)  # [N, Lc, H]
    # Short completions: the G completions of a prompt run as one row on top of its cache (no G-fold copy
    # of the cache): query rows of the packed block mask, keys = the prompt's cache, then the row's own
    # completion tokens.
    rows = g * (lc - 1)
    allowed = packed_attention_mask(mask, batch.completion_mask, g)[:, :, -rows:, :]  # [P, 1, rows, Lp+rows]
    positions = completion_positions(batch.prompt_mask, lc)[:, :-1].repeat(1, g)  # [P, G*(Lc-1)]
    rest, _ = net(
        input_ids=batch.completion_ids[:, :-1].reshape(p, rows),
        attention_mask=model_mask(net, allowed, "kv"),
        position_ids=positions,
        cache=cache,
        use_cache=True,
    )  # [P, G*(Lc-1), H]
    rest = rest.reshape(p * g, lc - 1, rest.shape[-1])  # [N, Lc-1, H]
    return torch.cat([first, rest], dim=1)  # [N, Lc, H]


def packed_attention_mask(
    prompt_mask: torch.Tensor, completion_mask: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Block mask of the packed rows ``prompt | c_1[:-1] | ... | c_G[:-1]`` (True = may attend).

    A prompt token attends causally within its prompt; a completion token attends to the prompt and to the
    earlier tokens of its own completion. Padding keys are masked out; every token attends to itself, so no
    row is fully masked (SDPA would return NaN there, and NaN times a zero weight stays NaN).

    Args:
        prompt_mask: ``[P, Lp]`` 1 for real prompt tokens.
        completion_mask: ``[P*G, Lc]`` 1 for real completion tokens.
        group_size: G.

    Returns:
        ``[P, 1, L, L]`` boolean mask with ``L = Lp + G*(Lc-1)``.

    """
    p, lp = prompt_mask.shape
    lc1 = completion_mask.shape[1] - 1
    device = prompt_mask.device
    valid = torch.cat(
        [prompt_mask.bool(), completion_mask[:, :-1].bool().reshape(p, group_size * lc1)], dim=1
    )  # [P, L]
    segment = torch.cat(
        [
            torch.zeros(lp, dtype=torch.long, device=device),
            torch.arange(1, group_size + 1, device=device).repeat_interleave(lc1),
        ]
    )  # [L]: 0 = prompt, j = completion j
    length = segment.shape[0]
    idx = torch.arange(length, device=device)
    causal = idx[None, :] <= idx[:, None]  # [L(q), L(k)]
    same_block = (segment[None, :] == 0) | (segment[None, :] == segment[:, None])  # [L, L]
    allowed = valid[:, None, :] & (causal & same_block)[None]  # [P, L, L]
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=device)[None]
    return allowed[:, None]  # [P, 1, L, L]


def model_mask(model: nn.Module, allowed: torch.Tensor, mode: str) -> torch.Tensor:
    """A boolean 4D mask (True = may attend) in the form the model's attention implementation takes as-is.

    SDPA takes it boolean; eager adds it to the scores, so it becomes 0 / dtype-min. Others (flash
    attention) take no custom 4D mask: a clear error.
    """
    inner = unwrap_net(model)
    inner = getattr(inner, "lm", inner)  # a PolicyNet's causal LM
    impl = getattr(inner.config, "_attn_implementation", None) or "sdpa"
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        dtype = inner.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)
    raise ValueError(
        f"shared-prompt mode {mode!r} needs a custom 4D attention mask, which attention implementation "
        f"{impl!r} does not take; load the model with attn_implementation='sdpa' or 'eager', or use "
        "shared_prompt: off"
    )


def _hidden_packed(net: nn.Module, batch: Batch) -> torch.Tensor:
    """``mode="packed"``: one row per group with a block mask. Returns ``[P*G, Lc, H]`` hidden states."""
    p, g, lp = batch.num_prompts, batch.group_size, batch.prompt_ids.shape[1]
    lc = batch.completion_ids.shape[1]
    ids = torch.cat(
        [batch.prompt_ids, batch.completion_ids[:, :-1].reshape(p, g * (lc - 1))], dim=1
    )  # [P, L], L = Lp + G*(Lc-1)
    positions = torch.cat(
        [
            prompt_positions(batch.prompt_mask),
            completion_positions(batch.prompt_mask, lc)[:, :-1].repeat(1, g),
        ],
        dim=1,
    )  # [P, L]
    allowed = packed_attention_mask(batch.prompt_mask, batch.completion_mask, g)  # [P, 1, L, L]
    hidden, _ = net(
        input_ids=ids,
        attention_mask=model_mask(net, allowed, "packed"),
        position_ids=positions,
        use_cache=False,
    )  # [P, L, H]
    hidden = hidden[:, lp - 1 :]  # [P, 1+G*(Lc-1), H]: position Lp-1, then each completion block
    width = hidden.shape[-1]
    first = hidden[:, :1, None].expand(p, 1, g, width).transpose(1, 2)  # [P, G, 1, H]
    rest = hidden[:, 1:].reshape(p, g, lc - 1, width)  # [P, G, Lc-1, H]
    return torch.cat([first, rest], dim=2).reshape(p * g, lc, width)  # [N, Lc, H]
