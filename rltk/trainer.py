"""The engine: one optimizer step = rollout → reward → advantage → update, for every algorithm.

    env.tasks ─▶ rollout.generate ─▶ Rubric.score ─▶ selection.select ─▶ collate ─▶ experience (no-grad:
    ref / old log-probs) ─▶ advantage.assign ─▶ epochs × minibatches of (forward + loss) ─▶ optimizer step
                                                                               └▶ metrics, checkpoint

An algorithm (GRPO, Dr. GRPO, DAPO, MaxRL, RLOO, PPO) is an advantage estimator plus a loss configuration
(``AlgorithmView``); the loop below is shared by all of them. The stages live in their modules:
:mod:`rltk.rollout`, :mod:`rltk.reward`, :mod:`rltk.experience` (with :mod:`rltk.selection` and
:mod:`rltk.advantage`), :mod:`rltk.update`; :class:`rltk.policy.Policy` owns the trained modules.

Determinism: every step reseeds python/numpy/torch from (seed, step, rank), so a run killed after step k
and resumed from its checkpoint replays steps k+1.. exactly (given the same thread count). Several ranks
(``accelerate launch --multi_gpu``) each roll out their own prompts; gradients are averaged by DDP and the
loss normaliser is a global count, so ``token_mean`` averages over the whole batch across micro-batches and
ranks.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase, get_scheduler

from rltk import checkpoint, distributed, evaluate, experience, plugins, rollout, rundir
from rltk.batch import Batch, Group
from rltk.config import Config, config_to_dict
from rltk.contract import warn_if_no_answers
from rltk.env import Env, Task
from rltk.failures import FailureGuard
from rltk.metrics import MetricsLogger, Progress, outcome_metrics
from rltk.models import load_tokenizer
from rltk.policy import Policy
from rltk.reward import Rubric
from rltk.sampler import make_sampler, vllm_options
from rltk.update import Updater

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
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(cfg.model.name)
        seed_everything(cfg.run.seed, -1)  # model init (LoRA A matrices) is seeded, equal on every rank
        self.policy = Policy(cfg, self.accelerator)
        self.optimizer = torch.optim.AdamW(
            self.policy.param_groups(),
            lr=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay,
            betas=tuple(cfg.optim.betas),
        )
        self.scheduler = get_scheduler(
            cfg.optim.schedule,
            self.optimizer,
            num_warmup_steps=cfg.optim.warmup_steps,
            num_training_steps=cfg.run.steps,
        )
        self.optimizer = self.policy.prepare(self.optimizer)
        self.updater = Updater(
            cfg, self.policy, self.optimizer, self.scheduler, self.accelerator, self._all_reduce_sums
        )
        r = cfg.rollout
        # An SFT-only run (warmstart.equal_time_as) samples only for its report: without one, no vLLM engine
        # (its start and memory) for a run that never samples; the HF sampler costs nothing to build.
        sampling = not cfg.warmstart.equal_time_as or cfg.eval.report.enabled
        backend = r.backend if sampling else "hf"
        options = vllm_options(backend, r.vllm_kv_cache_gib, r.vllm_python)
        self.sampler = make_sampler(backend, self.policy.lm, self.tokenizer, **options)
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
        """Close the metrics, stop the reward workers and the sampler, release the run dir (idempotent).

        Also after a failed :meth:`build`, which may have stopped before creating some of them.
        """
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "rubric"):
            self.rubric.close()
        if hasattr(self, "sampler"):
            self.sampler.close()
        if self.lock is not None:
            self.lock.release()

    # ----------------------------------------------------------------------------------------- set-up
    def train_pool_size(self) -> int:
        """Train tasks to generate: one fresh task per prompt slot of the run (at least 64)."""
        return max(64, self.cfg.run.steps * self.cfg.rollout.prompts_per_step * self.world)

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
        state = checkpoint.load(
            path, model=self.policy.lm, optimizer=self.optimizer, scheduler=self.scheduler
        )
        self.policy.load_checkpoint_extra(state["extra"])
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
            self.sampler.push_weights(self.policy.lm)  # as warm-started or resumed
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
        log.info(
            "rank %d/%d final weights sha256 %s", self.rank, self.world, self.policy.weights_digest()[:16]
        )

    @property
    def eval_max_new_tokens(self) -> int:
        """Tokens per assistant turn in evals: ``eval.max_new_tokens``, or the env's when that is 0."""
        return self.cfg.eval.max_new_tokens or self.env.max_new_tokens

    def held_out_eval(self, step: int) -> evaluate.EvalResult | None:
        """Held-out greedy pass@1 of the policy, logged at ``step`` as ``eval/*`` beside the trivial policy.

        The tasks are ``eval.n`` of ``eval.split`` with seed 0, the set ``rltk eval`` scores, so the figures
        compare. Whole episodes for multi-turn envs (:func:`rltk.evaluate.model_result`). Each rank plays
        ``tasks[rank::world]``, so no rank waits past ``run.dist_timeout_s`` while another evaluates alone;
        the main process puts the judged rollouts back in task order, scores them as one set and writes them
        to ``evals/step_NNNNNN.jsonl`` (one line per task). Returns the result there, ``None`` on other ranks.
        """
        cfg = self.cfg.eval
        result = None
        self.heartbeat.beat(step, "eval")
        start = time.perf_counter()
        tasks = self.env.tasks(cfg.split, cfg.n, seed=0)
        mine = evaluate.model_rollouts(
            self.sampler,
            self.tokenizer,
            self.env,
            self.rubric,
            tasks[self.rank :: self.world],
            self.eval_max_new_tokens,
        )
        judged = distributed.gather_shards([evaluate.for_summary(r) for r in mine], self.accelerator)
        if judged is not None:
            evaluate.write_rollouts(self.run_dir / "evals" / f"step_{step:06d}.jsonl", judged)
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

    def save(self, step: int) -> None:
        """Write a checkpoint of the current state; every rank calls it, the main process writes.

        Under FSDP the ranks gather the sharded optimizer state for it.
        """
        self.heartbeat.beat(step, "save")
        self.accelerator.wait_for_everyone()
        checkpoint.save(
            self.run_dir,
            step,
            model=self.policy.lm,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            extra={
                "data_position": (step * self.world) * self.cfg.rollout.prompts_per_step,
                "train_seconds": {"warmstart": self.warmstart_seconds, "rl": self.rl_seconds},
                **self.policy.checkpoint_extra(),
            },
            keep_last_n=self.cfg.run.keep_last_n,
            is_main_process=self.accelerator.is_main_process,
        )
        self.accelerator.wait_for_everyone()

    def step(self, step: int) -> StepResult:
        """One RL step: rollout → reward → experience (advantages) → update."""
        cfg = self.cfg
        seed_everything(cfg.run.seed, step, self.rank)
        t0 = time.perf_counter()

        # rollout: G samples per task, prompt prefilled once per group
        self.heartbeat.beat(step, "rollout")
        groups = rollout.generate(
            self.sampler,
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
        if self.algo.balance_answers:  # balancing needs answer classes: say so once if the env gives none
            warn_if_no_answers(self.env, [r for g in groups for r in g.rollouts])

        # experience: the kept groups as micro-batches, one no-grad pass where needed, then advantages
        self.heartbeat.beat(step, "update")
        t1 = time.perf_counter()
        batches, experience_metrics = self.make_experience(groups)
        m.update(experience_metrics)

        # update: epochs × minibatches of whole groups, forward (shared prompt) + loss per micro-batch
        m.update(self.updater.update(batches, step))
        self.sampler.push_weights(self.policy.lm)  # the next rollouts sample from the updated policy
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

    def make_experience(self, groups: list[Group]) -> tuple[list[Batch], dict[str, float]]:
        """This rank's micro-batches of the groups the step learns from, experience and advantages done."""
        return experience.make_experience(
            self.policy,
            self.algo,
            groups,
            per_micro_batch=self.cfg.optim.groups_per_micro_batch,
            rows_per_micro_batch=self.cfg.optim.rollouts_per_micro_batch,
            pad_id=self.tokenizer.pad_token_id,
            device=self.accelerator.device,
            all_reduce=self._all_reduce_sums,
        )

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
