"""One ``rltk train`` run, stage by stage: base report, warm start (or SFT only), RL, final report.

    Trainer(cfg) ──▶ [report: base] ──▶ warm start ──▶ [report: after warm start] ──▶ RL ──▶ [report: final]
                                  └──▶ SFT only, for another run's training wall time ──▶ [report: sft only]

Every run records its training wall time (``train_time.json``), which an SFT-only comparison run reads.
"""

from __future__ import annotations

import logging

from rltk.config import Config
from rltk.train_report import TrainReport
from rltk.trainer import Trainer

log = logging.getLogger("rltk")


def run_warm_start(trainer: Trainer, max_seconds: float | None = None) -> None:
    """SFT on demonstrations, once per run dir; saved as step 0 so a kill before RL loses nothing.

    Its wall time goes into ``trainer.warmstart_seconds`` (a resumed run kept it from its checkpoints).
    """
    if trainer.resumed_from is not None:
        return
    from rltk.warmstart import warm_start

    trainer.heartbeat.beat(0, "warmstart")
    trainer.warmstart_seconds = warm_start(trainer, max_seconds)["warmstart/time_s"]
    trainer.policy.snapshot_reference()
    trainer.save(0)


def run(cfg: Config) -> Trainer:
    """Build a trainer, warm-start it if asked, train, and write the proof report if asked: ``rltk train``.

    With ``warmstart.equal_time_as`` the warm start is the whole run (SFT only, for the other run's training
    wall time). Every run records its own training wall time (``train_time.json``).
    """
    from rltk.warmstart import equal_time_budget, record_train_time

    trainer = Trainer(cfg)
    try:
        report = TrainReport(trainer) if cfg.eval.report.enabled else None
        if report:  # a resumed run keeps the stage from before, or has none: its weights moved on
            report.stage("base", f"{cfg.model.name} before training", now=trainer.resumed_from is None)
        if cfg.warmstart.equal_time_as:
            budget = equal_time_budget(cfg.warmstart.equal_time_as)
            log.info("SFT only, for the %.0f s that %s trained", budget, cfg.warmstart.equal_time_as)
            run_warm_start(trainer, max_seconds=budget)
            if report:
                report.stage("sft only", f"{cfg.run.output_dir} @ step 0 (SFT alone, {budget:.0f} s)")
        else:
            if cfg.warmstart.enabled:
                run_warm_start(trainer)
                if report:
                    source = f"{cfg.run.output_dir} @ step 0"
                    report.stage("after warm start", source, now=trainer.start_step == 0)
            trained = trainer.start_step < cfg.run.steps  # this session moved the weights
            trainer.train(close=False)
            if report:
                report.stage("final", f"{cfg.run.output_dir} @ step {cfg.run.steps}", again=trained)
        if trainer.accelerator.is_main_process:
            steps = 0 if cfg.warmstart.equal_time_as else cfg.run.steps
            record_train_time(trainer.run_dir, trainer.warmstart_seconds, trainer.rl_seconds, steps)
        if report:
            report.finish()
    finally:
        trainer.close()
    return trainer
