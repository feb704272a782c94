"""The proof report at the end of ``rltk train`` (``eval.report.enabled``): base, after warm start, final.

Each stage is evaluated when the run passes it (the base model before the warm start, the warm-started model
before RL, the final model after it) and kept as JSON under ``<output_dir>/report/stages/``, so a resumed
run still reports the stages it passed before it was stopped. At the end the stages join the env's teacher,
oracle and best trivial policy in ``<output_dir>/report/report.{json,md,png}``, as ``rltk eval --compare``
writes them.

The main process evaluates while the other ranks wait at a barrier (``run.dist_timeout_s`` must cover one
stage's evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rltk import report, report_build, report_render

if TYPE_CHECKING:
    from rltk.trainer import Trainer

log = logging.getLogger("rltk")


def _load(path: Path) -> report.PolicyEval:
    data = json.loads(path.read_text())
    for key in ("greedy", "best_of_n"):
        if data[key] is not None:
            data[key] = [report.Attempt(**a) for a in data[key]]
    if data["samples"] is not None:
        data["samples"] = [[report.Attempt(**a) for a in row] for row in data["samples"]]
    return report.PolicyEval(**data)


def _dump(result: report.PolicyEval, path: Path) -> None:
    data = dataclasses.asdict(result)
    for attempts in [data["greedy"], data["best_of_n"] or [], *(data["samples"] or [])]:
        for a in attempts:
            a["answer"] = None  # votes are spent (best-of-N is picked); keys may not be JSON
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


class TrainReport:
    """The stages of one run's report.

    Args:
        trainer: The run's trainer (its policy, env, rubric, config and accelerator).

    """

    def __init__(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        rep = cfg.eval.report
        self.trainer = trainer
        self.dir = Path(cfg.run.output_dir) / "report"
        self.settings = report.ReportSettings(
            samples=rep.samples,
            sampled_tasks=rep.sampled_tasks or None,
            bon=rep.bon,
            temperature=rep.temperature,
            max_new_tokens=trainer.eval_max_new_tokens,
            seed=cfg.run.seed,
        )
        self.tasks = trainer.env.tasks(cfg.eval.split, cfg.eval.n, seed=0)  # the set rltk eval scores
        self.stages: list[str] = []

    def _path(self, name: str) -> Path:
        return self.dir / "stages" / f"{name.replace(' ', '_')}.json"

    def stage(self, name: str, source: str, now: bool = True, again: bool = False) -> None:
        """Evaluate the current policy as row ``name``, once per run dir (a resumed run keeps the first).

        ``now``: whether the current policy still is that stage's; a resumed run whose weights moved past a
        stage it has no record of leaves the row out (and says so). ``again``: evaluate even if the stage is
        on file (the final model of a run that trained further).
        """
        t = self.trainer
        self.stages.append(name)
        if self._path(name).is_file() and not again:
            return
        if not now:
            log.warning("report: no row %r (the run resumed past it before it was evaluated)", name)
            return
        if t.accelerator.is_main_process:
            t.heartbeat.beat(0, f"report: {name}")
            t.sampler.push_weights(t.policy.lm)  # the stage's weights (a warm start moved them)
            result = report.evaluate_model(
                t.sampler, t.tokenizer, t.env, t.rubric, self.tasks, self.settings, name, source
            )
            self._path(name).parent.mkdir(parents=True, exist_ok=True)
            _dump(result, self._path(name))
            log.info("report stage %r: greedy accuracy %.1f%%", name, 100 * _accuracy(result))
        t.accelerator.wait_for_everyone()

    def finish(self) -> dict[str, Any] | None:
        """Write the report from every stage on file, beside the env's scripted policies (main process)."""
        t = self.trainer
        if not t.accelerator.is_main_process:
            return None
        rows = [_load(self._path(n)) for n in self.stages if self._path(n).is_file()]
        rows += report.scripted_policies(t.env, t.rubric, self.tasks)
        meta = {"env_options": dict(t.cfg.env.options), "split": t.cfg.eval.split, "task_seed": 0}
        built = report_build.build_report(t.env, self.tasks, rows, self.settings, meta)
        paths = report_render.write(self.dir, built)
        log.info("proof report written: %s\n%s", ", ".join(map(str, paths)), report_render.summary(built))
        return built


def _accuracy(result: report.PolicyEval) -> float:
    return sum(a.correct for a in result.greedy) / max(1, len(result.greedy))
