"""The weights a policy samples with, as a plain transformers model's state dict, LoRA merged functionally.

Samplers that hold their own copy of the weights (vLLM) get ``W + B @ A * scale`` per LoRA layer, computed
without touching the training module: merging and unmerging it in place would drift its fp32 weights.
"""

from __future__ import annotations

import torch
from torch import nn

from rltk.net import PolicyNet, unwrap_net


def plain_model(model: nn.Module) -> nn.Module:
    """The causal LM inside ``model``: unwraps DDP (``.module``) and :class:`~rltk.net.PolicyNet`."""
    model = unwrap_net(model)
    return model.lm if isinstance(model, PolicyNet) else model


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and hasattr(module, "lora_A")


def _is_modules_to_save(module: nn.Module) -> bool:
    return hasattr(module, "original_module") and hasattr(module, "modules_to_save")


def _active_adapters(module: nn.Module) -> list[str]:
    if getattr(module, "disable_adapters", False):
        return []
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def _lora_weight(module: nn.Module) -> torch.Tensor:
    """``base + sum of the active adapters' deltas`` of one peft LoRA layer, without touching the layer."""
    base = module.base_layer.weight
    weight = base.detach()
    merged = set(getattr(module, "merged_adapters", []))  # already inside the base weight
    adapters = set(module.lora_A) | set(getattr(module, "lora_embedding_A", {}))
    for name in _active_adapters(module):
        if name not in adapters or name in merged:
            continue
        if getattr(module, "use_dora", {}).get(name, False):
            raise NotImplementedError("VLLMSampler merges plain LoRA adapters; DoRA is not supported")
        weight = weight + module.get_delta_weight(name).detach().to(base.dtype)
    return weight


def _collect(module: nn.Module, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if _is_lora_layer(module):
        out[prefix + "weight"] = _lora_weight(module)
        bias = getattr(module.base_layer, "bias", None)
        if bias is not None:
            out[prefix + "bias"] = bias.detach()
        return
    if _is_modules_to_save(module):
        active = _active_adapters(module)
        chosen = next((module.modules_to_save[a] for a in active if a in module.modules_to_save), None)
        _collect(chosen if chosen is not None else module.original_module, prefix, out)
        return
    for name, param in module._parameters.items():
        if param is not None:
            out[prefix + name] = param.detach()
    for name, buf in module._buffers.items():
        if buf is not None and name not in module._non_persistent_buffers_set:
            out[prefix + name] = buf.detach()
    for name, child in module._modules.items():
        if child is not None:
            _collect(child, prefix + name + ".", out)


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights the policy samples with, named as the plain HF model's, LoRA merged functionally.

    Every peft LoRA layer contributes ``base_layer.weight + get_delta_weight(adapter)`` for its active,
    not yet merged adapters (none while adapters are disabled); ``modules_to_save`` contribute their active
    copy. Tied weights appear under both names (``lm_head.weight`` and ``model.embed_tokens.weight``), as
    separate tensors, so the dict can be written with safetensors. The model is not modified.

    Args:
        model: A causal LM (transformers, optionally peft-wrapped, a :class:`~rltk.net.PolicyNet` or
            DDP-wrapped).
        dtype: Cast floating-point tensors to this dtype (``None``: keep each tensor's own).

    Returns:
        Contiguous CPU tensors by name, e.g. ``model.layers.0.self_attn.q_proj.weight``.

    """
    lm = plain_model(model)
    if hasattr(lm, "peft_config") and hasattr(lm, "get_base_model"):
        lm = lm.get_base_model()
    raw: dict[str, torch.Tensor] = {}
    _collect(lm, "", raw)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in raw.items():
        t = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        t = t.to("cpu").contiguous()
        if t.data_ptr() in seen:  # a tied tensor again: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    return out
