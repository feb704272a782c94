"""FSDP2 (``fully_shard``, through accelerate) under rltk: full weights on every rank, the rest sharded.

    accelerate.prepare ─▶ PolicyNet sharded: each decoder layer a unit, the root unit the rest
    register_root      ─▶ every unit gathered in full (one all-gather), never resharded by FSDP itself
    optimizer.step     ─▶ (any optimizer over the shards: RL, warm start) the stale full weights are dropped
                          and gathered again from the updated shards (every rank steps together)

What FSDP shards here: the gradients (reduce-scattered in the backward), the optimizer state and the weights
the optimizer updates (fp32 master weights under mixed precision). What it does not: the full weights every
forward uses stay on every rank, ZeRO-2 style. Sampling, evals, the KL reference and saving run on
``PolicyNet.lm`` outside FSDP's forward; each rank samples a different number of tokens (``generate`` runs as
many forwards as its longest completion), which per-layer all-gathers could not survive; and the main process
saves alone. Sampling needs the full weights on every rank anyway, so they bound the memory already.
Resharding them during the update only (ZeRO-3 there) would save memory at the price of all-gathers per layer
and micro-batch: not done. The cost here: one all-gather of the weights per optimizer step.

In the backward FSDP reduce-scatters a layer's gradients once per forward call of it, so every rank must run
the same forward calls with gradients: :class:`rltk.policy.Policy` refuses ``algorithm.shared_prompt=kv``
(whose calls vary with the data) and stops a step whose ranks hold different numbers of micro-batches.

The module's registered parameters are the gathered full tensors: ``PolicyNet.lm.named_parameters()`` and
:func:`plain_state_dict` read full weights without a collective (``module.state_dict()`` must not be used:
FSDP's state-dict hook reshards on this rank alone). The shards, which the optimizer updates and the
gradients land on, are :func:`sharded_parameters` (``PolicyNet.named_parameters()`` returns them).
Loading (:func:`load_full`) writes each rank's shard of full tensors and gathers again: every rank loads.

Optimizer state is sharded like the weights: :func:`full_optimizer_state` all-gathers it (every rank),
:func:`shard_optimizer_state` cuts a full one back into this rank's shards (no collective).

The private FSDP2 attributes used here (``_get_fsdp_state``, ``_lazy_init``, ``_fsdp_param_groups``,
``post_forward_mesh_info``) are exercised by ``tests/test_fsdp.py`` on the installed torch (2.13).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "describe",
    "fsdp_modules",
    "full_optimizer_state",
    "has_sharded_state",
    "is_sharded",
    "load_full",
    "plain_state_dict",
    "refresh",
    "register_root",
    "root_of",
    "shard_optimizer_state",
    "sharded_parameters",
]


class _Root:
    """What :func:`register_root` keeps of one sharded net: its shards by name and their ids."""

    def __init__(self, root: nn.Module) -> None:
        self.ref = weakref.ref(root)
        self.shards = list(root.named_parameters())  # right after fully_shard: the sharded DTensors
        self.ids = {id(p) for _, p in self.shards}


_ROOTS: weakref.WeakKeyDictionary[nn.Module, _Root] = weakref.WeakKeyDictionary()
_HOOK: list[Any] = []


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 units in ``module`` (itself included), in ``modules()`` order: the same on every rank."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules is an FSDP2 unit."""
    return bool(fsdp_modules(module))


def describe(root: nn.Module) -> str:
    """``"3 units, this rank holds 52,416 of 104,832 parameter elements"``: what sharding left here."""
    from torch.distributed.tensor import DTensor

    params = list(root.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    total = sum(p.numel() for p in params)
    return f"{len(fsdp_modules(root))} units, this rank holds {local:,} of {total:,} parameter elements"


def _groups(unit: nn.Module) -> list[Any]:
    return list(unit._get_fsdp_state()._fsdp_param_groups)


@torch.no_grad()
def register_root(root: nn.Module, *members: nn.Module) -> None:
    """Take over the FSDP2 net ``root`` (just prepared): gather its weights for good (module docstring).

    ``members`` (the LM, the critic) live in its tree: :func:`root_of` finds ``root`` from them. A
    collective: every rank calls it, right after ``accelerator.prepare``.
    """
    info = _Root(root)
    for member in (root, *members):
        _ROOTS[member] = info
    # The root runs FSDP's lazy init (as its first forward would): a decoder layer called first by
    # generate would otherwise take the root's role
    root._get_fsdp_state()._lazy_init()
    for unit in fsdp_modules(root):
        unit.set_reshard_after_backward(False, recurse=False)
        for group in _groups(unit):
            group.post_forward_mesh_info = None  # no reshard after forward either
        unit.unshard()
    if not _HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK.append(register_optimizer_step_post_hook(_after_step))


def root_of(module: nn.Module) -> nn.Module | None:
    """The FSDP root ``module`` belongs to (:func:`register_root`), or None (not sharded)."""
    info = _ROOTS.get(module)
    return info.ref() if info is not None else None


def sharded_parameters(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Parameter]]:
    """``root``'s shards by name: what the optimizer updates and the gradients land on."""
    for name, p in _ROOTS[root].shards:
        yield prefix + name, p


@torch.no_grad()
def refresh(root: nn.Module) -> None:
    """Drop the full weights of ``root``'s units and all-gather them again from the shards (collective)."""
    units = fsdp_modules(root)
    for unit in units:
        unit.reshard()
    for unit in units:
        unit.unshard()


def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """After any optimizer step: refresh the nets whose shards it updated (every rank steps together)."""
    del args, kwargs
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    roots = {id(info): info.ref() for info in _ROOTS.values() if info.ids & ids}
    for root in roots.values():
        if root is not None:
            refresh(root)


def plain_state_dict(module: nn.Module, detach: bool = True) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` (parameters and persistent buffers, tied names each) without its hooks.

    With ``detach`` False the values are the parameters and buffers themselves (tied names: one object).
    """
    out: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, p in sub._parameters.items():
            if p is not None:
                out[dot + name] = p.detach() if detach else p
        for name, b in sub._buffers.items():
            if b is not None and name not in sub._non_persistent_buffers_set:
                out[dot + name] = b.detach() if detach else b
    return out


def _shard_like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``target``: this rank's shard for a DTensor (no collective), else as is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(device=target.device, dtype=target.dtype)
    if not isinstance(target, DTensor):
        return full
    return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)


@torch.no_grad()
def load_full(
    root: nn.Module,
    module: nn.Module,
    weights: dict[str, torch.Tensor],
    rename: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Copy the full tensors ``weights`` into ``module``'s shards, then gather again (every rank).

    The keys are those of :func:`plain_state_dict` of ``module``, or those ``rename`` (a function of that
    dict, e.g. peft's ``get_peft_model_state_dict``) gives. Each rank keeps its own shard of the same
    weights; the only collective is the gather. Returns the targets (the shards, by key), for checks.
    """
    for unit in fsdp_modules(root):
        unit.reshard()  # the modules now hold their shards
    try:
        targets = plain_state_dict(module, detach=False)  # the parameters themselves: tied names, one object
        if rename is not None:
            targets = rename(targets)
        for key, value in weights.items():
            if key in targets:
                targets[key].copy_(_shard_like(value, targets[key]))
    finally:
        for unit in fsdp_modules(root):
            unit.unshard()
    return targets


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded tensor all-gathered in full, on the CPU.

    A collective: every rank calls it (the state's order is the same on every rank). Ranks with ``keep``
    False get the structure with ``None`` in place of the gathered tensors (they do not write it).
    """
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state: dict[Any, dict[str, Any]] = {}
    for index in sorted(sd["state"]):
        state[index] = {}
        for key, value in sd["state"][index].items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
                value = value.cpu() if keep else None
            state[index][key] = value
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict (:func:`full_optimizer_state`) cut to this rank's shards of the params."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[Any, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        p = params[int(index)]
        state[index] = {
            key: _shard_like(value, p)
            if isinstance(p, DTensor) and isinstance(value, torch.Tensor) and value.shape == p.shape
            else value
            for key, value in entries.items()
        }
    return {"state": state, "param_groups": sd["param_groups"]}


def has_sharded_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` holds sharded (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"])
