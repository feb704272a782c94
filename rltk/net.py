"""The trained module: a causal LM's trunk whose output head runs outside it, a chunk of tokens at a time.

    PolicyNet(input ids, masks, positions, cache) ──trunk──▶ hidden [B, S, H], cache
    rltk.logprobs.token_scores(hidden, PolicyNet.head, …) ──▶ log-probs [N, Lc], entropies [N, Lc]

The LM's own forward would apply its output head to every position and hand back ``[B, S, V]`` logits
(V = 49,152 for SmolLM2): for a multi-turn batch the fp32 logits, their log-softmax and the gradients of both
were most of a step's peak memory. Here the trunk returns hidden states, and :mod:`rltk.logprobs` applies the
head to a few hundred positions at a time, recomputing each chunk in the backward pass.

The trainer prepares ``PolicyNet`` (not the LM) with accelerate, so under DDP every trunk call goes through
the wrapper's forward, as DDP requires. Sampling, saving and export use :attr:`PolicyNet.lm`.

:class:`ValueHead` is PPO's critic on the same trunk. :class:`rltk.policy.Policy` owns both.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from rltk.models import context_length

__all__ = ["PolicyNet", "ValueHead", "as_net", "unwrap_net"]


class PolicyNet(nn.Module):
    """A causal LM seen as trunk (hidden states) and head (``get_output_embeddings``).

    Args:
        lm: A transformers causal LM, optionally peft-wrapped (LoRA layers live inside the trunk).

    Raises:
        ValueError: For an LM whose logits are not ``head(hidden)`` (logit soft-capping or scaling).

    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        config = lm.config
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1.0) != 1.0:
            raise ValueError(
                f"model type {config.model_type!r} transforms its logits after the output head (soft-capping "
                "or scaling), which rltk's chunked log-probs do not apply; use a model whose logits are "
                "lm_head(hidden states) (Llama, Qwen, Mistral, SmolLM, ...)"
            )
        self.lm = lm

    @property
    def config(self) -> PretrainedConfig:
        """The LM's config."""
        return self.lm.config

    @property
    def head(self) -> nn.Module:
        """The output head: hidden ``[..., H]`` → logits ``[..., V]`` (tied to the embeddings or not)."""
        return self.lm.get_output_embeddings()

    @property
    def trunk(self) -> nn.Module:
        """The decoder stack, final norm included (LoRA adapters, if any, are inside it)."""
        return self.lm.get_decoder()

    def context_length(self) -> int:
        """The LM's maximum sequence length."""
        return context_length(self.lm)

    def forward(self, **inputs: object) -> tuple:
        """Run the trunk; returns ``(hidden [B, S, H], cache)`` (the cache is ``None`` without ``use_cache``).

        ``inputs`` are the decoder's keyword arguments: ``input_ids``, ``attention_mask``, ``position_ids``,
        ``cache``, ``use_cache``.
        """
        out = self.trunk(**inputs)
        return out.last_hidden_state, getattr(out, "cache", None)


def unwrap_net(model: nn.Module) -> nn.Module:
    """``model`` without a data-parallel wrapper (DDP keeps the wrapped module as ``.module``)."""
    return getattr(model, "module", model)


def as_net(model: nn.Module) -> nn.Module:
    """A module returning ``(hidden, cache)``: ``model`` if it is a (wrapped) :class:`PolicyNet`.

    Otherwise a :class:`PolicyNet` around the causal LM ``model`` (sharing its parameters).
    """
    return model if isinstance(unwrap_net(model), PolicyNet) else PolicyNet(model)


class ValueHead(nn.Module):
    """PPO's critic on the policy's trunk: ``V(s_t)`` from the hidden state that predicts token ``t``.

    One linear layer in fp32, zero-initialised, so every value starts at 0 (the first advantages are the
    plain reward-to-go) and the head never perturbs the policy it shares a trunk with until it has learned.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` hidden states → ``[...]`` values."""
        return self.linear(hidden.float()).squeeze(-1)
