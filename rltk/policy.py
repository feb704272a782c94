"""The policy RL trains: the LM, PPO's critic and the KL reference, and what a checkpoint keeps of them.

Policy(cfg) ──param_groups──▶ optimizer ──prepare──▶ one module on the device (DDP or FSDP across ranks)
Policy.scores(batch)      log-probs, entropies, values (with grad)      ── the update
Policy.experience(batch)  reference and old log-probs, old values (no grad) ── before advantages
Policy.checkpoint_extra() reference snapshot, critic                    ── beside the LM's weights

The critic lives inside the :class:`~rltk.net.PolicyNet` (``value_head``), so one prepared module holds every
trained weight (FSDP2 prepares a single module) and every use of a weight runs through its ``forward``.
Under FSDP every rank holds the full weights (gathered again after each optimizer step) and its shard of the
gradients and optimizer state (:mod:`rltk.fsdp`); ``net.parameters()`` are the shards, ``lm``'s the full
weights.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rltk import fsdp
from rltk.batch import Batch
from rltk.forward import completion_logprobs, completion_scores
from rltk.logprobs import TokenScores
from rltk.models import build_policy
from rltk.net import PolicyNet, ValueHead, ValuesThroughNet, unwrap_net

if TYPE_CHECKING:
    from accelerate import Accelerator

    from rltk.config import Config

log = logging.getLogger("rltk")


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
        accelerator: The run's accelerator (device; DDP or FSDP wrapping).

    """

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg, self.algo, self.accelerator = cfg, cfg.algorithm.resolved(), accelerator
        lm = build_policy(cfg)
        self.critic: ValueHead | None = None  # the value head inside ``net``, unwrapped
        if self.algo.critic:
            self.critic = ValueHead(lm.config.hidden_size)
            self.critic.requires_grad_(self.algo.vf_coef > 0)  # vf_coef 0: a frozen critic (ablation)
        self.net: nn.Module = PolicyNet(lm, value_head=self.critic)
        self.reference: dict[str, torch.Tensor] | None = None
        self.micro_batches = 0  # this step's experience passes: its micro-batches (FSDP checks them)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the policy's trainable weights, then the critic's."""
        critic = {id(p) for p in self.critic.parameters()} if self.critic is not None else set()
        policy = [p for p in self.net.parameters() if p.requires_grad and id(p) not in critic]
        groups: list[dict[str, Any]] = [{"params": policy}]
        if self.critic is not None and self.algo.vf_coef > 0:
            groups.append(
                {"params": list(self.critic.parameters()), "lr": self.algo.critic_lr or self.cfg.optim.lr}
            )
        return groups

    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Let accelerate place and wrap the net (DDP or FSDP across ranks) with the optimizer; returns it.

        Under FSDP the full weights are then gathered on every rank (:func:`rltk.fsdp.register_root`).

        Raises:
            ConfigError: Under FSDP with ``algorithm.shared_prompt=kv`` (its forward calls vary with data).

        """
        self.net, optimizer = self.accelerator.prepare(self.net, optimizer)
        if fsdp.is_sharded(self.net):
            if self.algo.shared_prompt == "kv":
                from rltk.config import ConfigError
                from rltk.typedyaml import problem

                why = (
                    "under FSDP each layer's gradients are reduce-scattered once per forward call of it, so "
                    "every rank must run the same forward calls; kv's number depends on the data (a pass for "
                    "a prefix the prompts share, or not)"
                )
                fix = "use algorithm.shared_prompt=packed (the same log-probs, one forward per micro-batch)"
                raise ConfigError([problem("algorithm.shared_prompt", "kv", why, fix)])
            log.info("FSDP2: %s", fsdp.describe(self.net))
            fsdp.register_root(self.net, self.lm, *([self.critic] if self.critic is not None else []))
        if self.algo.beta > 0 and not self.cfg.model.lora.enabled:
            self.snapshot_reference()
        return optimizer

    @property
    def sharded(self) -> bool:
        """Whether the net is sharded with FSDP2 (:mod:`rltk.fsdp`)."""
        return fsdp.root_of(self.net) is not None

    @property
    def lm(self) -> nn.Module:
        """The causal LM, unwrapped (what sampling, evaluation, saving and export use)."""
        return unwrap_net(self.net).lm

    def modules(self) -> list[nn.Module]:
        """The trained modules, as prepared (possibly DDP- or FSDP-wrapped): the net (the critic inside)."""
        return [self.net]

    def train(self, mode: bool = True) -> None:
        """Put the net in train mode when an update starts, in eval mode when it ends (on every rank).

        Under FSDP the ranks check, when an update starts, that they hold as many micro-batches
        (:meth:`check_micro_batches`).
        """
        self.net.train(mode)
        if mode:
            if self.sharded:
                self.check_micro_batches()
            self.micro_batches = 0

    def check_micro_batches(self) -> None:
        """Under FSDP, stop (on every rank) when the ranks hold different numbers of micro-batches this step.

        Each forward with grad reduce-scatters its gradients in its backward, so the ranks must run the same
        forwards; DDP only needs the last backward of a minibatch on every rank. A rank holds fewer groups
        when some failed or dynamic sampling dropped them: the update would wait for the missing collectives
        until ``run.dist_timeout_s``. One all-reduce of two numbers.

        Raises:
            ConfigError: The ranks' micro-batch counts differ; names the counts and the settings to change.

        """
        counts = torch.tensor([self.micro_batches, -self.micro_batches], device=self.accelerator.device)
        most, least = self.accelerator.reduce(counts, reduction="max").tolist()
        if most != -least:
            from rltk.config import ConfigError
            from rltk.typedyaml import problem

            why = (
                f"under FSDP every rank must train on as many micro-batches, but this step's range from "
                f"{-least} to {most} (groups dropped by failed rewards or dynamic sampling); rltk/update.py "
                "does not pad them yet"
            )
            fix = "launch with recipes/accelerate/ddp.yaml, or set algorithm.dynamic_sampling=false"
            raise ConfigError([problem("accelerate config", "FSDP", why, fix)])

    def parameters(self) -> list[torch.Tensor]:
        """Every trainable parameter (gradient clipping, the zero-loss backward of an idle rank)."""
        return [p for m in self.modules() for p in m.parameters() if p.requires_grad]

    def scores(
        self, batch: Batch, *, entropy: bool = True, entropy_grad: bool = False, values: bool = False
    ) -> TokenScores:
        """Log-probs of ``batch``'s model tokens, their entropies and values; with grad if grad is enabled.

        ``entropy``: also the next-token entropies (the update logs them); ``values``: the critic's values.
        """
        return completion_scores(
            self.net,
            batch,
            temperature=self.cfg.rollout.temperature,
            mode=self.algo.shared_prompt,
            entropy=entropy,
            entropy_grad=entropy_grad,
            value_head=ValuesThroughNet(self.net) if values and self.critic is not None else None,
        )

    @torch.no_grad()
    def experience(self, batch: Batch, *, old: bool) -> None:
        """The no-grad pass: ``ref_logp`` (β > 0), ``old_logp`` (with ``old``), ``values`` (a critic)."""
        self.micro_batches += 1
        if self.algo.beta > 0:
            batch.ref_logp = self.reference_logprobs(batch)
        if old or self.critic is not None:
            scores = self.scores(batch, entropy=False, values=self.critic is not None)  # no entropy: unused
            batch.old_logp = scores.logp if old else None
            batch.values = scores.values

    def snapshot_reference(self) -> None:
        """Freeze the current trainable weights as the KL reference (the policy at the start of RL).

        Only the trainable tensors are copied (LoRA: the adapters, a few MB), and only when ``beta > 0``.
        The snapshot travels in every checkpoint, so a resumed run keeps the same reference. Under FSDP it
        holds the full weights (what ``lm`` holds).
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
        """What a checkpoint keeps besides the LM's weights: the reference snapshot, the critic.

        Reads no state dict hook (:func:`rltk.fsdp.plain_state_dict`): under FSDP the main process calls this
        alone, on the full weights.
        """
        extra: dict[str, Any] = {}
        if self.reference is not None:
            extra["reference"] = self.reference
        if self.critic is not None:
            extra["critic"] = {k: v.cpu() for k, v in fsdp.plain_state_dict(self.critic).items()}
        return extra

    def load_checkpoint_extra(self, extra: dict[str, Any]) -> None:
        """Restore what :meth:`checkpoint_extra` kept (every rank: under FSDP the critic loads by shards)."""
        if "reference" in extra:
            self.reference = extra["reference"]
        if self.critic is not None:
            if "critic" not in extra:
                raise ValueError(
                    "this checkpoint has no critic: it was not saved by a run with algorithm.critic"
                )
            if self.sharded:
                fsdp.load_full(self.net, self.critic, extra["critic"])
            else:
                self.critic.load_state_dict(extra["critic"])

    def weights_digest(self) -> str:
        """Sha256 over the trainable parameters (critic included): equal on every rank when in sync."""
        digest = hashlib.sha256()
        named = list(self.lm.named_parameters())
        if self.critic is not None:
            named += [(f"critic.{n}", p) for n, p in self.critic.named_parameters()]
        for name, p in sorted(named, key=lambda item: item[0]):
            if p.requires_grad:
                digest.update(name.encode())
                digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
