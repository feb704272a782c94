"""The engine: one optimizer step = rollout → reward → advantage → update, for every algorithm.

    env.tasks ─▶ rollout.generate ─▶ Rubric.score ─▶ advantage.compute ─▶ collate ─▶ forward + loss ─▶ step
                                                                                     └▶ metrics, checkpoint

An algorithm (GRPO, Dr. GRPO, DAPO; PPO later) is an advantage estimator plus a loss configuration
(``AlgorithmView``); the loop below is shared by all of them.

Determinism: every step reseeds python/numpy/torch from (seed, step, rank), so a run killed after step k
and resumed from its checkpoint replays steps k+1.. exactly (given the same thread count). Several ranks
(``accelerate launch --multi_gpu``) each roll out their own prompts; gradients are averaged by DDP and the
loss normaliser is a global count, so ``token_mean`` averages over the whole batch across micro-batches and
ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from rltk import advantage, checkpoint, distributed, evaluate, forward, loss, plugins, rollout, rundir
from rltk.batch import Batch, Group, collate
from rltk.config import Config, config_to_dict
from rltk.env import Env, Task
from rltk.failures import FailureGuard, NonFiniteGuard
from rltk.metrics import MetricsLogger, Progress, outcome_metrics
from rltk.models import build_policy, load_tokenizer
from rltk.reward import Rubric

log = logging.getLogger("rltk")


def seed_everything(seed: int, *parts: int) -> None:
    """Seed python, numpy and torch from ``seed`` and any further ints (step, rank)."""
    digest = hashlib.sha256(":".join(str(x) for x in (seed, *parts)).encode()).digest()
    s = int.from_bytes(digest[:4], "little")
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


@dataclass
class StepResult:
    """What one step produced, for logging."""

    metrics: dict[str, float]
    groups: list[Group]


class Trainer:
    """Builds everything a run needs from a :class:`Config` and runs the RL loop."""

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None) -> None:
        self.cfg = cfg
        self.algo = cfg.algorithm.resolved()
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.accelerator = accelerator or distributed.make_accelerator(cfg)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.run_dir = Path(cfg.run.output_dir)
        log.info("rank %d of world size %d on %s", self.rank, self.world, self.accelerator.device)
        self.lock = self.lock_run_dir()
        try:
            self.build()
        except BaseException:  # a run refused at set-up leaves the run dir (and its lock) as it found it
            self.close()
            raise

    def build(self) -> None:
        """Everything after the lock: env, rubric, model, optimizer, tasks, metrics; then resume."""
        cfg = self.cfg
        # after the lock: a run refused there must not overwrite the live run's heartbeats
        self.heartbeat = distributed.Heartbeat(self.run_dir, self.rank)
        self.heartbeat.beat(0, "setup")
        self.env: Env = plugins.make_env(cfg.env.name, cfg.env.options)
        self.rubric = Rubric.from_config(
            cfg.rewards, self.env, timeout_s=cfg.rollout.reward_timeout_s, workers=cfg.rollout.reward_workers
        )
        self.failure_guard = FailureGuard(cfg.rollout.max_reward_error_rate, cfg.rollout.reward_error_window)
        self.nonfinite_guard = NonFiniteGuard()
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(cfg.model.name)
        seed_everything(cfg.run.seed, -1)  # model init (LoRA A matrices) is seeded, equal on every rank
        self.model = build_policy(cfg)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas)
        )
        self.scheduler = get_scheduler(
            cfg.optim.schedule,
            self.optimizer,
            num_warmup_steps=cfg.optim.warmup_steps,
            num_training_steps=cfg.run.steps,
        )
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        # KL reference = the policy at the start of RL. A LoRA run without warm start gets it for free
        # (adapters disabled); otherwise it is a snapshot of the trainable weights (see snapshot_reference).
        self.reference: dict[str, torch.Tensor] | None = None
        if self.algo.beta > 0 and not cfg.model.lora.enabled:
            self.snapshot_reference()
        self.train_tasks = self.env.tasks("train", self.train_pool_size(), seed=cfg.run.seed)
        self.start_step = 0
        # training wall time so far (evals and saves excluded), kept in checkpoints: train_time.json
        self.warmstart_seconds = self.rl_seconds = 0.0
        self.resumed_from: Path | None = None
        self.metrics = MetricsLogger(
            self.run_dir,
            cfg.run.report_to,
            config_to_dict(cfg),
            is_main_process=self.accelerator.is_main_process,
            rank=self.rank,
        )
        self.resume()
        if self.accelerator.is_main_process:
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    def close(self) -> None:
        """Close the metrics, stop the reward workers and release the run dir (idempotent).

        Also after a failed :meth:`build`, which may have stopped before creating some of them.
        """
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "rubric"):
            self.rubric.close()
        if self.lock is not None:
            self.lock.release()

    # ----------------------------------------------------------------------------------------- set-up
    def train_pool_size(self) -> int:
        """Train tasks to generate: one fresh task per prompt slot of the run (at least 64)."""
        return max(64, self.cfg.run.steps * self.cfg.rollout.prompts_per_step * self.world)

    @property
    def policy(self) -> PreTrainedModel:
        """The model without DDP wrapping (what generation and saving use)."""
        return self.accelerator.unwrap_model(self.model)

    def lock_run_dir(self) -> rundir.RunDirLock | None:
        """Create the run dir and lock it (main process); every rank fails alike if another run holds it."""
        lock, busy = None, None
        if self.accelerator.is_main_process:
            try:
                lock = rundir.RunDirLock(self.run_dir)
            except rundir.RunDirBusyError as exc:
                busy = exc
        if self.all_reduce_sum(float(busy is not None)):
            raise busy or rundir.RunDirBusyError(f"run dir {self.run_dir} is in use by another run (rank 0)")
        return lock

    def resume(self) -> None:
        """Resume from the newest valid checkpoint (``run.resume=auto``), or start at step 0.

        Either way ``metrics.jsonl`` keeps only what was logged up to that point, so no step is logged twice.
        A run dir whose checkpoints are all damaged stops with :class:`~rltk.checkpoint.CheckpointError`
        (:func:`rltk.rundir.resume_point`), leaving them as they are.
        """
        path = rundir.resume_point(self.run_dir) if self.cfg.run.resume == "auto" else None
        if path is None:
            self.metrics.truncate_after(-1)
            return
        state = checkpoint.load(path, model=self.policy, optimizer=self.optimizer, scheduler=self.scheduler)
        if "reference" in state["extra"]:
            self.reference = state["extra"]["reference"]
        seconds = state["extra"].get("train_seconds", {})
        self.warmstart_seconds, self.rl_seconds = seconds.get("warmstart", 0.0), seconds.get("rl", 0.0)
        self.start_step = int(state["step"])
        self.resumed_from = path
        self.metrics.truncate_after(self.start_step, until=float(state["saved_at"]))
        log.info("resumed from %s at step %d", path, self.start_step)

    def tasks_for_step(self, step: int) -> list[Task]:
        """This rank's prompts for ``step``: a deterministic slice of the train pool."""
        p = self.cfg.rollout.prompts_per_step
        start = (step * self.world + self.rank) * p
        return [self.train_tasks[(start + i) % len(self.train_tasks)] for i in range(p)]

    # ------------------------------------------------------------------------------------------- loop
    def train(self, close: bool = True) -> None:
        """Run RL from ``start_step`` to ``run.steps``, saving and logging as configured.

        Adds each step's wall time to ``rl_seconds`` (kept in checkpoints: a resumed run counts the steps it
        kept). ``close``: release the run (:meth:`close`) at the end.
        """
        cfg = self.cfg
        progress = Progress(
            total=cfg.run.steps, start=self.start_step, enabled=self.accelerator.is_main_process
        )
        try:
            if cfg.eval.every and self.start_step == 0:
                self.held_out_eval(0)  # the policy RL starts from (after the warm start, if any)
            for step in range(self.start_step, cfg.run.steps):
                result = self.step(step)
                self.rl_seconds += result.metrics["time/step_s"]
                if (step + 1) % cfg.run.log_every == 0 or step + 1 == cfg.run.steps:
                    self.metrics.log(step + 1, result.metrics)
                progress.update(step + 1, result.metrics)
                last = step + 1 == cfg.run.steps
                if cfg.eval.every and (last or (step + 1) % cfg.eval.every == 0):
                    self.held_out_eval(step + 1)
                if last or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                    self.save(step + 1)
        finally:
            progress.close()
            if close:
                self.close()
        log.info("rank %d/%d final weights sha256 %s", self.rank, self.world, self.weights_digest()[:16])

    @property
    def eval_max_new_tokens(self) -> int:
        """Tokens per assistant turn in evals: ``eval.max_new_tokens``, or the env's when that is 0."""
        return self.cfg.eval.max_new_tokens or self.env.max_new_tokens

    def held_out_eval(self, step: int) -> evaluate.EvalResult | None:
        """Held-out greedy pass@1 of the policy, logged at ``step`` as ``eval/*`` beside the trivial policy.

        The tasks are ``eval.n`` of ``eval.split`` with seed 0, the set ``rltk eval`` scores, so the figures
        compare. Whole episodes for multi-turn envs (:func:`rltk.evaluate.model_result`). Each rank plays
        ``tasks[rank::world]``, so no rank waits past ``run.dist_timeout_s`` while another evaluates alone;
        the main process puts the judged rollouts back in task order and scores them as one set. Returns the
        result there, ``None`` on other ranks.
        """
        cfg = self.cfg.eval
        result = None
        self.heartbeat.beat(step, "eval")
        start = time.perf_counter()
        tasks = self.env.tasks(cfg.split, cfg.n, seed=0)
        mine = evaluate.model_rollouts(
            self.policy,
            self.tokenizer,
            self.env,
            self.rubric,
            tasks[self.rank :: self.world],
            self.eval_max_new_tokens,
        )
        judged = distributed.gather_shards([evaluate.for_summary(r) for r in mine], self.accelerator)
        if judged is not None:
            result = evaluate.summarize(f"step {step}", judged)
            trivial = evaluate.best_of(evaluate.baseline_results(self.env, self.rubric, tasks), "")
            self.metrics.log(
                step,
                {
                    "eval/accuracy": result.accuracy,
                    "eval/mean_reward": result.mean_reward,
                    "eval/best_trivial_accuracy": trivial.accuracy if trivial else 0.0,
                    "eval/seconds": time.perf_counter() - start,
                },
            )
            log.info(
                "eval at step %d: %s pass@1 %.1f%% (mean reward %+.3f) on %d tasks; best trivial policy %s",
                step,
                cfg.split,
                100 * result.accuracy,
                result.mean_reward,
                result.n,
                f"{trivial.name} {100 * trivial.accuracy:.1f}%" if trivial else "none",
            )
        self.accelerator.wait_for_everyone()
        return result

    def weights_digest(self) -> str:
        """Sha256 over the trainable parameters: equal on every rank when replicas are in sync."""
        digest = hashlib.sha256()
        for name, p in sorted(self.policy.named_parameters()):
            if p.requires_grad:
                digest.update(name.encode())
                digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def save(self, step: int) -> None:
        """Write a checkpoint of the current state (main process writes, all ranks wait)."""
        self.heartbeat.beat(step, "save")
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            checkpoint.save(
                self.run_dir,
                step,
                model=self.policy,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                extra={
                    "data_position": (step * self.world) * self.cfg.rollout.prompts_per_step,
                    "train_seconds": {"warmstart": self.warmstart_seconds, "rl": self.rl_seconds},
                    **({"reference": self.reference} if self.reference is not None else {}),
                },
                keep_last_n=self.cfg.run.keep_last_n,
            )
        self.accelerator.wait_for_everyone()

    def step(self, step: int) -> StepResult:
        """One RL step: rollout → reward → advantage → update."""
        cfg, algo = self.cfg, self.algo
        seed_everything(cfg.run.seed, step, self.rank)
        t0 = time.perf_counter()

        # rollout: G samples per task, prompt prefilled once per group
        self.heartbeat.beat(step, "rollout")
        groups = rollout.generate(
            self.policy,
            self.tokenizer,
            self.env,
            self.tasks_for_step(step),
            group_size=cfg.rollout.group_size,
            max_new_tokens=cfg.rollout.max_new_tokens,
            min_new_tokens=cfg.rollout.min_new_tokens,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            max_turns=cfg.rollout.max_turns or None,
            max_rollout_tokens=cfg.rollout.max_rollout_tokens or None,
            env_timeout_s=cfg.rollout.env_timeout_s,
        )
        t_gen = time.perf_counter() - t0

        # reward: rubric over the env's outcome; failed rollouts leave the update (and can stop the run)
        self.heartbeat.beat(step, "reward")
        m: dict[str, float] = dict(self.rubric.score(groups))
        m.update(self.check_failures(groups))
        m.update(outcome_metrics(groups))

        # advantage: group-relative; dynamic sampling may drop zero-variance groups
        adv = advantage.compute(groups, algo)
        m.update(adv.metrics)

        # update: forward (shared prompt) + loss, micro-batches of whole groups
        self.heartbeat.beat(step, "update")
        t1 = time.perf_counter()
        m.update(self.update(adv.groups, step))
        t_train = time.perf_counter() - t1

        elapsed = time.perf_counter() - t0
        p, g = len(groups), cfg.rollout.group_size
        lp = sum(len(gr.prompt_ids) for gr in groups) / max(1, p)
        lc = sum(len(r.token_ids) for gr in groups for r in gr.rollouts) / max(1, p * g)
        m.update(
            {
                "time/step_s": elapsed,
                "time/generate_s": t_gen,
                "time/update_s": t_train,
                "tokens/prompt_mean": lp,
                "tokens/completion_mean": lc,
                "tokens/per_s": p * g * (lp + lc) / elapsed,
                "lr": self.scheduler.get_last_lr()[0],
            }
        )
        return StepResult(metrics=m, groups=groups)

    def check_failures(self, groups: list[Group]) -> dict[str, float]:
        """Count this step's failed rollouts per source over all ranks; stop the run past the allowed rate.

        Raises:
            rltk.reward.RewardError: From :class:`~rltk.failures.FailureGuard`, naming the source.

        """
        rollouts = [r for g in groups for r in g.rollouts]
        sources = [it.name for it in self.rubric.items] + ["env"]
        local = [float(len(rollouts)), float(sum(r.failed for r in rollouts))]
        local += [float(sum(any(f.source == s for f in r.failures) for r in rollouts)) for s in sources]
        n, failed, *per_source = self._all_reduce_sums(local)
        examples = [(f, r.turns[-1] if r.turns else "") for r in rollouts for f in r.failures]
        counts = {s: int(k) for s, k in zip(sources, per_source, strict=True) if k}
        self.failure_guard.check(int(n), counts, examples)
        return {"rollout/failed_frac": failed / max(1.0, n)}

    def update(self, groups: list[Group], step: int) -> dict[str, float]:
        """Optimizer step(s) of RL step ``step`` on the kept groups; returns loss metrics.

        The loss normaliser is one global count (all micro-batches, all ranks), so the summed micro-batch
        gradients are the full-batch gradient (:meth:`backward`). An optimizer step whose loss or gradient
        norm is not finite is skipped on every rank (:meth:`optimizer_step`).
        """
        batches, normalizer = self.micro_batches(groups)
        if normalizer <= 0:  # no rank kept a group: nothing to learn from this step
            self.advance_schedule()
            return {"update/skipped": 1.0}
        self.model.train()
        sums: dict[str, float] = {}
        for _ in range(self.algo.updates_per_batch):
            sums = self.backward(batches, normalizer)
            sums.update(self.optimizer_step(step, sums["loss"]))
        self.advance_schedule()
        self.model.eval()
        return sums

    def advance_schedule(self) -> None:
        """Step the LR schedule, which counts RL steps, those without an optimizer step too.

        A step can keep no group or have a non-finite loss, so torch's warning about a scheduler stepped
        before its optimizer is expected here.
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            self.scheduler.step()

    def micro_batches(self, groups: list[Group]) -> tuple[list[Batch], float]:
        """This rank's micro-batches of whole groups (on the device) and the step's global loss normaliser."""
        per_mb, pad = self.cfg.optim.groups_per_micro_batch, self.tokenizer.pad_token_id
        batches = [collate(groups[i : i + per_mb], pad) for i in range(0, len(groups), per_mb)]
        normalizer = loss.normalizer_for(
            batches, self.algo.aggregation, self.cfg.rollout.max_new_tokens, all_reduce=self.all_reduce_sum
        )
        return [b.to(self.accelerator.device) for b in batches], normalizer

    def backward(self, batches: list[Batch], normalizer: float) -> dict[str, float]:
        """Accumulate the gradient of the whole step's loss over ``batches``; returns the loss metrics.

        DDP averages gradients over ranks, hence ``backward(loss * world)``. A rank left without groups
        (dynamic sampling, failures) still runs a zero-loss backward so DDP's gradient all-reduce has every
        rank.
        """
        cfg, algo = self.cfg, self.algo
        sums = {"loss": 0.0, "loss/tokens": 0.0}
        weighted: dict[str, float] = {}
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                if batch.ref_logp is None and algo.beta > 0:
                    batch.ref_logp = self.reference_logprobs(batch)
                scores = forward.completion_scores(
                    self.model,
                    batch,
                    temperature=cfg.rollout.temperature,
                    mode=algo.shared_prompt,
                    entropy=True,  # logged always; differentiable only for an entropy bonus
                    entropy_grad=algo.entropy_coef > 0,
                )
                logp = scores.logp  # [P*G, Lc]
                if batch.old_logp is None and algo.updates_per_batch > 1:
                    batch.old_logp = logp.detach()  # later passes are off-policy by one update
                result = loss.policy_loss(logp, batch, algo, normalizer, entropy=scores.entropy)
                self.accelerator.backward(result.loss * self.world)
            tokens = result.metrics.pop("loss/tokens")
            sums["loss/tokens"] += tokens
            sums["loss"] += result.metrics.pop("loss/value")
            for k, v in result.metrics.items():
                weighted[k] = weighted.get(k, 0.0) + v * tokens
            if batch.sample_logp is not None and tokens:
                gap = (logp.detach() - batch.sample_logp).abs() * batch.loss_mask
                weighted["mismatch/logp_abs_mean"] = weighted.get("mismatch/logp_abs_mean", 0.0) + float(
                    gap.sum()
                )
        if not batches:  # this rank has nothing but must join the gradient all-reduce
            zero = sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
            self.accelerator.backward(zero)
        sums.update({k: v / max(1.0, sums["loss/tokens"]) for k, v in weighted.items()})
        return sums

    def optimizer_step(self, step: int, loss_value: float) -> dict[str, float]:
        """Clip and apply the accumulated gradient, unless the loss or its norm is not finite on any rank.

        A skipped step leaves the weights and the optimizer state as they were; three in a row stop the run
        (:class:`~rltk.failures.NonFiniteGuard`). The verdict is all-reduced, so every rank skips alike.
        """
        params = self.model.parameters()
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

    def snapshot_reference(self) -> None:
        """Freeze the current trainable weights as the KL reference (the policy at the start of RL).

        Only the trainable tensors are copied (LoRA: the adapters, a few MB), and only when ``beta > 0``.
        The snapshot travels in every checkpoint, so a resumed run keeps the same reference.
        """
        if self.algo.beta > 0:
            self.reference = {
                name: p.detach().clone() for name, p in self.policy.named_parameters() if p.requires_grad
            }

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:  # [P*G, Lc]
        """Log-probs under the reference policy, without a second model.

        With a snapshot (warm start, or a full fine-tune), its weights are swapped into the trainable
        parameters for one no-grad forward and swapped back; otherwise (LoRA from scratch) the reference is
        the base with adapters disabled.
        """
        policy = self.policy

        def run() -> torch.Tensor:
            return forward.completion_logprobs(
                policy, batch, temperature=self.cfg.rollout.temperature, mode=self.algo.shared_prompt
            )

        with torch.no_grad():
            if self.reference is not None:
                params = {n: p for n, p in policy.named_parameters() if n in self.reference}
                current = {n: p.data for n, p in params.items()}
                try:
                    for n, p in params.items():
                        p.data = self.reference[n].to(p.device)
                    return run()
                finally:
                    for n, p in params.items():
                        p.data = current[n]
            with policy.disable_adapter():
                return run()

    def all_reduce_sum(self, value: float) -> float:
        """``value`` summed over ranks (itself on one process): decisions every rank must take alike."""
        return self._all_reduce_sums([value])[0]

    def _all_reduce_sums(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()


__all__ = [
    "StepResult",
    "Trainer",
    "seed_everything",
]
