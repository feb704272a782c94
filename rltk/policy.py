"""The policy RL trains: the LM, PPO's critic and the KL reference, and what a checkpoint keeps of them.

Policy(cfg) ──param_groups──▶ optimizer ──prepare──▶ modules on the device (DDP across ranks)
Policy.scores(batch)      log-probs, entropies, values (with grad)      ── the update
Policy.experience(batch)  reference and old log-probs, old values (no grad) ── before advantages
Policy.checkpoint_extra() reference snapshot, critic                    ── beside the LM's weights
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rltk.batch import Batch
from rltk.forward import completion_logprobs, completion_scores
from rltk.logprobs import TokenScores
from rltk.models import build_policy
from rltk.net import PolicyNet, ValueHead, unwrap_net

if TYPE_CHECKING:
    from accelerate import Accelerator

    from rltk.config import Config


class Policy:
    """What RL trains and keeps: the LM (LoRA or full) as a :class:`PolicyNet`, the critic, the KL reference.

    The trainer runs the loop; this object builds the modules, hands the optimizer its parameter groups,
    scores batches (log-probs, entropies, values), computes the no-grad experience (old and reference
    log-probs, old values), and says what a checkpoint keeps besides the LM's weights (the reference
    snapshot, the critic). Export takes :attr:`lm` only, so the critic never leaves a run.

    The KL reference is the policy RL starts from: with LoRA and no warm start, the base with adapters
    disabled (free); otherwise a snapshot of the trainable weights (:meth:`snapshot_reference`).

    Args:
        cfg: The run's config.
        accelerator: The run's accelerator (device, DDP wrapping).

    """

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg, self.algo, self.accelerator = cfg, cfg.algorithm.resolved(), accelerator
        lm = build_policy(cfg)
        self.net: nn.Module = PolicyNet(lm)
        self.critic: nn.Module | None = None
        if self.algo.critic:
            self.critic = ValueHead(lm.config.hidden_size)
            self.critic.requires_grad_(self.algo.vf_coef > 0)  # vf_coef 0: a frozen critic (ablation)
        self.reference: dict[str, torch.Tensor] | None = None

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the policy's trainable weights, then the critic's."""
        groups: list[dict[str, Any]] = [{"params": [p for p in self.net.parameters() if p.requires_grad]}]
        if self.critic is not None and self.algo.vf_coef > 0:
            groups.append(
                {"params": list(self.critic.parameters()), "lr": self.algo.critic_lr or self.cfg.optim.lr}
            )
        return groups

    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Let accelerate place and wrap the modules (DDP across ranks) with the optimizer; returns it."""
        acc = self.accelerator
        if self.critic is not None and self.algo.vf_coef > 0:
            self.net, self.critic, optimizer = acc.prepare(self.net, self.critic, optimizer)
        else:
            self.net, optimizer = acc.prepare(self.net, optimizer)
            if self.critic is not None:  # frozen: nothing for DDP to synchronise
                self.critic.to(acc.device)
        if self.algo.beta > 0 and not self.cfg.model.lora.enabled:
            self.snapshot_reference()
        return optimizer

    @property
    def lm(self) -> nn.Module:
        """The causal LM, unwrapped (what sampling, evaluation, saving and export use)."""
        return unwrap_net(self.net).lm

    def modules(self) -> list[nn.Module]:
        """The trained modules, as prepared (possibly DDP-wrapped)."""
        return [self.net] if self.critic is None else [self.net, self.critic]

    def train(self, mode: bool = True) -> None:
        """Put every module in train (or eval) mode."""
        for module in self.modules():
            module.train(mode)

    def parameters(self) -> list[torch.Tensor]:
        """Every trainable parameter (gradient clipping, the zero-loss backward of an idle rank)."""
        return [p for m in self.modules() for p in m.parameters() if p.requires_grad]

    def scores(self, batch: Batch, *, entropy_grad: bool = False, values: bool = False) -> TokenScores:
        """Log-probs and entropies (and values, with ``values``) of ``batch``'s model tokens, with grad."""
        return completion_scores(
            self.net,
            batch,
            temperature=self.cfg.rollout.temperature,
            mode=self.algo.shared_prompt,
            entropy=True,  # logged always; differentiable only for an entropy bonus
            entropy_grad=entropy_grad,
            value_head=self.critic if values else None,
        )

    @torch.no_grad()
    def experience(self, batch: Batch, *, old: bool) -> None:
        """The no-grad pass: ``ref_logp`` (β > 0), ``old_logp`` (with ``old``), ``values`` (a critic)."""
        if self.algo.beta > 0:
            batch.ref_logp = self.reference_logprobs(batch)
        if old or self.critic is not None:
            scores = self.scores(batch, values=self.critic is not None)
            batch.old_logp = scores.logp if old else None
            batch.values = scores.values

    def snapshot_reference(self) -> None:
        """Freeze the current trainable weights as the KL reference (the policy at the start of RL).

        Only the trainable tensors are copied (LoRA: the adapters, a few MB), and only when ``beta > 0``.
        The snapshot travels in every checkpoint, so a resumed run keeps the same reference.
        """
        if self.algo.beta > 0:
            self.reference = {n: p.detach().clone() for n, p in self.lm.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> torch.Tensor:  # [P*G, Lc]
        """Log-probs under the reference policy, without a second model.

        With a snapshot, its weights are swapped into the trainable parameters for one forward and swapped
        back; otherwise (LoRA from scratch) the reference is the base with adapters disabled.
        """
        lm, temperature, mode = self.lm, self.cfg.rollout.temperature, self.algo.shared_prompt
        if self.reference is None:
            with lm.disable_adapter():
                return completion_logprobs(lm, batch, temperature=temperature, mode=mode)
        params = {n: p for n, p in lm.named_parameters() if n in self.reference}
        current = {n: p.data for n, p in params.items()}
        try:
            for n, p in params.items():
                p.data = self.reference[n].to(p.device)
            return completion_logprobs(lm, batch, temperature=temperature, mode=mode)
        finally:
            for n, p in params.items():
                p.data = current[n]

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the LM's weights: the reference snapshot, the critic."""
        extra: dict[str, Any] = {}
        if self.reference is not None:
            extra["reference"] = self.reference
        if self.critic is not None:
            extra["critic"] = {k: v.detach().cpu() for k, v in unwrap_net(self.critic).state_dict().items()}
        return extra

    def load_checkpoint_extra(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_extra` kept."""
        if "reference" in extra:
            self.reference = extra["reference"]
        if self.critic is not None:
            if "critic" not in extra:
                raise ValueError(
                    "this checkpoint has no critic: it was not saved by a run with algorithm.critic"
                )
            unwrap_net(self.critic).load_state_dict(extra["critic"])

    def weights_digest(self) -> str:
        """Sha256 over the trainable parameters (critic included): equal on every rank when in sync."""
        digest = hashlib.sha256()
        named = list(self.lm.named_parameters())
        if self.critic is not None:
            named += [(f"critic.{n}", p) for n, p in unwrap_net(self.critic).named_parameters()]
        for name, p in sorted(named, key=lambda item: item[0]):
            if p.requires_grad:
                digest.update(name.encode())
                digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
