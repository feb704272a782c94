"""The trained module: a causal LM's trunk whose output head runs outside it, a chunk of tokens at a time.

    PolicyNet(input ids, masks, positions, cache) ──trunk──▶ hidden [B, S, H], cache
    rltk.logprobs.token_scores(hidden, PolicyNet.head, …) ──▶ log-probs [N, Lc], entropies [N, Lc]

The LM's own forward would apply its output head to every position and hand back ``[B, S, V]`` logits
(V = 49,152 for SmolLM2): for a multi-turn batch the fp32 logits, their log-softmax and the gradients of both
were most of a step's peak memory. Here the trunk returns hidden states, and :mod:`rltk.logprobs` applies the
head to a few hundred positions at a time, recomputing each chunk in the backward pass.

The trainer prepares ``PolicyNet`` (not the LM) with accelerate, and the trunk, the head and the critic all
run through its ``forward``: a data-parallel wrapper sees every use of the weights (DDP prepares its gradient
reduction there, FSDP registers its gradients' reduce-scatter there). Sampling, saving and export use
:attr:`PolicyNet.lm`; under FSDP it holds the full weights on every rank (:mod:`rltk.fsdp`).

:class:`ValueHead` is PPO's critic on the same trunk; the policy's ``PolicyNet`` holds it (``value_head``) and
runs it through ``forward`` too. :class:`rltk.policy.Policy` owns the net.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from rltk import fsdp
from rltk.logprobs import TokenScores, token_scores
from rltk.models import context_length

__all__ = ["PolicyNet", "ValueHead", "ValuesThroughNet", "as_net", "unwrap_net"]


class PolicyNet(nn.Module):
    """A causal LM seen as trunk (hidden states) and head (``get_output_embeddings``).

    Args:
        lm: A transformers causal LM, optionally peft-wrapped (LoRA layers live inside the trunk).
        value_head: PPO's critic, kept here so that one module holds every trained weight (FSDP2 prepares a
            single module) and runs through :meth:`forward` (``value=``).

    Raises:
        ValueError: For an LM whose logits are not ``head(hidden)`` (logit soft-capping or scaling).

    """

    def __init__(self, lm: nn.Module, value_head: ValueHead | None = None) -> None:
        super().__init__()
        config = lm.config
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", 1.0) != 1.0:
            raise ValueError(
                f"model type {config.model_type!r} transforms its logits after the output head (soft-capping "
                "or scaling), which rltk's chunked log-probs do not apply; use a model whose logits are "
                "lm_head(hidden states) (Llama, Qwen, Mistral, SmolLM, ...)"
            )
        self.lm = lm
        self.value_head = value_head

    @property
    def config(self) -> PretrainedConfig:
        """The LM's config."""
        return self.lm.config

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The LM's block classes (decoder layers): FSDP's transformer auto-wrap makes each its own unit."""
        return getattr(self.lm, "_no_split_modules", None)

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

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """``nn.Module``'s, but under FSDP the shards: what optimizers update and gradients land on.

        The modules inside hold the full weights, gathered on every rank (:mod:`rltk.fsdp`): read those
        through :attr:`lm` (sampling, saving, the KL reference).
        """
        if recurse and fsdp.root_of(self) is self:
            return fsdp.sharded_parameters(self, prefix)
        return super().named_parameters(prefix, recurse, remove_duplicate)

    def forward(
        self, score: dict[str, Any] | None = None, value: torch.Tensor | None = None, **inputs: Any
    ) -> tuple | TokenScores | torch.Tensor:
        """Run the trunk; or, on hidden states, the output head (``score``) or the critic (``value``).

        All go through this method so that a data-parallel wrapper sees every use of the weights: DDP
        prepares its gradient reduction in ``forward``, and FSDP its gradients' reduce-scatter.

        Args:
            score: Keyword arguments of :func:`rltk.logprobs.token_scores` but the head (``hidden``,
                ``targets``, ``mask``, ``temperature``, ``entropy``, ``entropy_grad``): returns their
                :class:`~rltk.logprobs.TokenScores`.
            value: ``[..., H]`` hidden states: returns the critic's ``[...]`` values (:attr:`value_head`).
            **inputs: The decoder's keyword arguments: ``input_ids``, ``attention_mask``,
                ``position_ids``, ``cache``, ``use_cache``.

        Returns:
            ``(hidden [B, S, H], cache)`` (the cache is ``None`` without ``use_cache``), the scores, or
            the values.

        """
        if score is not None:
            return token_scores(head=self.head, **score)
        if value is not None:
            if self.value_head is None:
                raise ValueError("this PolicyNet has no value head")
            return self.value_head(value)
        out = self.trunk(**inputs)
        return out.last_hidden_state, getattr(out, "cache", None)


class ValuesThroughNet(nn.Module):
    """``hidden → values`` by way of ``net(value=hidden)``: the critic inside a (wrapped) :class:`PolicyNet`.

    What :func:`rltk.forward.completion_scores` takes as its ``value_head``. ``net`` is held, not registered:
    this module owns no weights.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.__dict__["net"] = net  # not a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` hidden states → ``[...]`` values."""
        return self.net(value=hidden)


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

        V(s_t) = μ + σ · (w · h_t + b)        # μ, σ: running mean and std of the returns of earlier steps

    One linear layer in fp32, zero-initialised, so every value starts at μ (0 before any step: the first
    advantages are the plain reward-to-go) and the head never perturbs the policy it shares a trunk with
    until it has learned. μ and σ (:meth:`observe`, debiased exponential averages, buffers saved with the
    head) take the returns' scale and drift off the layer: left to learn the mean return itself, Adam moved
    ``w`` along the hidden states' common direction, whose projection varies from token to token, and the
    values' spread grew faster than their fit (explained variance below -1 after 20 steps on invoice easy).
    """

    def __init__(self, hidden_size: int, decay: float = 0.9) -> None:
        super().__init__()
        self.decay = decay
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        # Exponential averages of the returns' first and second moments, and their total weight
        # (1 - decay^k after k steps), which debiases them as Adam does its moments.
        self.register_buffer("moment1", torch.zeros((), dtype=torch.float64))
        self.register_buffer("moment2", torch.zeros((), dtype=torch.float64))
        self.register_buffer("weight", torch.zeros((), dtype=torch.float64))

    def scale(self) -> tuple[float, float]:
        """``(μ, σ)``: the running mean and std of the returns observed so far (``(0, 1)`` before any)."""
        w = float(self.weight)
        if w <= 0:
            return 0.0, 1.0
        mean = float(self.moment1) / w
        return mean, max(float(self.moment2) / w - mean**2, 0.0) ** 0.5

    @torch.no_grad()
    def observe(self, mean: float, second_moment: float) -> None:
        """Fold one step's returns (their mean and mean square over the model tokens) into μ and σ."""
        for buffer, value in ((self.moment1, mean), (self.moment2, second_moment), (self.weight, 1.0)):
            buffer.mul_(self.decay).add_((1 - self.decay) * value)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` hidden states → ``[...]`` values."""
        mean, std = self.scale()
        return mean + std * self.linear(hidden.float()).squeeze(-1)
