"""Stage "update": epochs × minibatches of optimizer steps on a step's experience, for every algorithm.

    micro-batches (advantages set) ──for epoch: for minibatch──▶ forward + policy loss (+ value loss)
        ──backward, accumulated over the minibatch's micro-batches──▶ clip ──▶ optimizer step

Each optimizer step's loss normaliser is one global count (its micro-batches, all ranks), so the summed
micro-batch gradients are that minibatch's gradient; DDP averages gradients over ranks, hence
``backward(loss * world)``. A step whose loss or gradient norm is not finite is skipped on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings

import torch
from accelerate import Accelerator

from rltk import loss
from rltk.advantage import AllReduce
from rltk.batch import Batch
from rltk.config import Config
from rltk.failures import NonFiniteGuard
from rltk.policy import Policy

log = logging.getLogger("rltk")


class Updater:
    """The optimizer steps of RL steps: holds the policy, optimizer, LR schedule and non-finite guard.

    Args:
        cfg: The run's config.
        policy: The policy (prepared).
        optimizer: Its optimizer (prepared).
        scheduler: The LR schedule, stepped once per RL step.
        accelerator: The run's accelerator.
        all_reduce: Sums a list of floats over ranks.

    """

    def __init__(
        self,
        cfg: Config,
        policy: Policy,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        accelerator: Accelerator,
        all_reduce: AllReduce,
    ) -> None:
        self.cfg, self.algo, self.policy = cfg, cfg.algorithm.resolved(), policy
        self.optimizer, self.scheduler, self.accelerator = optimizer, scheduler, accelerator
        self.world = accelerator.num_processes
        self._all_reduce = all_reduce
        self.nonfinite_guard = NonFiniteGuard()

    def all_reduce_sum(self, value: float) -> float:
        """``value`` summed over ranks."""
        return self._all_reduce([value])[0]

    def update(self, batches: list[Batch], step: int) -> dict[str, float]:
        """The optimizer steps of RL step ``step``; returns the loss metrics, averaged over them.

        ``algorithm.epochs`` passes over this rank's micro-batches, each pass split into
        ``algorithm.minibatches`` optimizer steps; the epochs stop early once a minibatch's approximate KL
        (all ranks) passes ``algorithm.target_kl``. Each optimizer step's loss normaliser is one global
        count (its micro-batches, all ranks), so the summed micro-batch gradients are that minibatch's
        gradient (:meth:`backward`). An optimizer step whose loss or gradient norm is not finite is skipped
        on every rank (:meth:`optimizer_step`). The micro-batch order is shuffled per epoch after the first
        (seeded by the step, as everything else).
        """
        algo, steps = self.algo, []
        self.policy.train()
        for epoch in range(algo.epochs):
            order = batches if epoch == 0 else [batches[i] for i in torch.randperm(len(batches)).tolist()]
            for part in chunks(order, algo.minibatches):
                normalizer = loss.normalizer_for(
                    part, algo.aggregation, self.cfg.rollout.max_new_tokens, all_reduce=self.all_reduce_sum
                )
                if normalizer <= 0:  # no rank kept a group here: nothing to learn from
                    continue
                sums = self.backward(part, normalizer, step, reuse=algo.epochs > 1)
                sums.update(self.optimizer_step(step, sums["loss"]))
                steps.append(sums)
            kl = self.all_reduce_sum(steps[-1].get("loss/approx_kl", 0.0)) / self.world if steps else 0.0
            if algo.target_kl and kl > algo.target_kl:
                break  # the policy moved far enough from the one that sampled
        self.advance_schedule()
        self.policy.train(False)
        if not steps:
            return {"update/skipped": 1.0}
        keys = {k for s in steps for k in s}
        out = {k: sum(s.get(k, 0.0) for s in steps) / sum(k in s for s in steps) for k in keys}
        return {**out, "update/optimizer_steps": float(len(steps))}

    def backward(
        self, batches: list[Batch], normalizer: float, step: int, reuse: bool = False
    ) -> dict[str, float]:
        """Accumulate the gradient of one optimizer step's loss over ``batches``; returns the loss metrics.

        ``reuse``: the batches will be trained on again (epochs > 1): the first forward's log-probs become
        their ``old_logp`` where the experience pass left none (no optimizer step came before it).

        DDP averages gradients over ranks, hence ``backward(loss * world)``. A rank left without groups
        (dynamic sampling, failures) still runs a zero-loss backward so DDP's gradient all-reduce has every
        rank.
        """
        sums = {"loss": 0.0, "loss/tokens": 0.0}
        weighted: dict[str, float] = {}
        for i, batch in enumerate(batches):
            with contextlib.ExitStack() as no_sync:
                if i < len(batches) - 1:  # gradients are all-reduced once, after the last micro-batch
                    for module in self.policy.modules():
                        no_sync.enter_context(self.accelerator.no_sync(module))
                total, metrics = self.micro_batch_loss(batch, normalizer, step, reuse)
                self.accelerator.backward(total * self.world)
            tokens = metrics.pop("loss/tokens")
            sums["loss/tokens"] += tokens
            sums["loss"] += metrics.pop("loss/value")
            for k, v in metrics.items():
                weighted[k] = weighted.get(k, 0.0) + v * tokens
        if not batches:  # this rank has nothing but must join the gradient all-reduce
            self.accelerator.backward(sum(p.sum() * 0.0 for p in self.policy.parameters()))
        sums.update({k: v / max(1.0, sums["loss/tokens"]) for k, v in weighted.items()})
        return sums

    def micro_batch_loss(
        self, batch: Batch, normalizer: float, step: int, reuse: bool
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch's share of the loss (policy, and value with a critic) and its metrics.

        During ``algorithm.critic_warmup_steps`` only the value loss trains.
        """
        algo, critic = self.algo, self.policy.critic is not None
        scores = self.policy.scores(batch, entropy_grad=algo.entropy_coef > 0, values=critic)
        logp = scores.logp  # [P*G, Lc]
        if batch.old_logp is None and reuse:
            batch.old_logp = logp.detach()  # later passes are off-policy
        result = loss.policy_loss(logp, batch, algo, normalizer, entropy=scores.entropy)
        metrics = result.metrics
        total = result.loss * float(step >= algo.critic_warmup_steps)
        if critic and algo.vf_coef > 0:
            value = loss.value_loss(scores.values, batch, algo, normalizer)
            total = total + algo.vf_coef * value.loss
            metrics.update(value.metrics)
        metrics["loss/value"] = float(total.detach())
        if batch.sample_logp is not None and metrics["loss/tokens"]:
            gap = (logp.detach() - batch.sample_logp).abs() * batch.loss_mask
            metrics["mismatch/logp_abs_mean"] = float(gap.sum()) / metrics["loss/tokens"]
        return total, metrics

    def optimizer_step(self, step: int, loss_value: float) -> dict[str, float]:
        """Clip and apply the accumulated gradient, unless the loss or its norm is not finite on any rank.

        A skipped step leaves the weights and the optimizer state as they were; three in a row stop the run
        (:class:`~rltk.failures.NonFiniteGuard`). The verdict is all-reduced, so every rank skips alike.
        """
        params = self.policy.parameters()
        grad_norm = float(self.accelerator.clip_grad_norm_(params, self.cfg.optim.max_grad_norm))
        bad = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        apply = self.nonfinite_guard.check(step + 1, finite=not self.all_reduce_sum(float(bad)))
        if apply:
            self.optimizer.step()
        else:
            log.warning("step %d: non-finite loss (%s) or gradient norm (%s); optimizer step skipped",
                        step + 1, loss_value, grad_norm)  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        out = {"update/nonfinite_skipped": float(not apply)}
        if apply:
            out["grad_norm"] = grad_norm
        return out

    def advance_schedule(self) -> None:
        """Step the LR schedule, which counts RL steps, those without an optimizer step too.

        A step can keep no group or have a non-finite loss, so torch's warning about a scheduler stepped
        before its optimizer is expected here.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            self.scheduler.step()


def chunks(items: list[Batch], k: int) -> list[list[Batch]]:
    """``items`` in ``k`` contiguous parts of near-equal size (some empty when there are fewer than ``k``).

    >>> chunks([1, 2, 3, 4, 5], 2), chunks([1], 3)
    ([[1, 2, 3], [4, 5]], [[1], [], []])
    """
    size, extra = divmod(len(items), k)
    bounds = [i * size + min(i, extra) for i in range(k + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(k)]
