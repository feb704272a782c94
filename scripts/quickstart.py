"""Quickstart: RL on the embedded SmolLM2-135M-Instruct for policy-compliance flagging, on a CPU.

Trains with ``recipes/quickstart.yaml`` (plus any ``key=value`` overrides) and prints held-out greedy
accuracy on the eval split: the base model, the best constant answer, the best single-rule heuristic, the
warm-started model (if the recipe warm-starts) and the model after RL, with recall per rule.
Writes ``eval.json`` into the run dir.

    python scripts/quickstart.py [run.seed=1] [run.output_dir=runs/qs-seed1]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from rltk import evaluate, plugins
from rltk.config import load_config
from rltk.errors import user_errors
from rltk.evaluate import EvalResult
from rltk.pipeline import run_warm_start
from rltk.trainer import Trainer

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"


def model_row(trainer: Trainer, tasks: list, name: str) -> EvalResult:
    """Greedy accuracy of the trainer's current policy on ``tasks``."""
    answers = evaluate.greedy_completions(
        trainer.policy, trainer.tokenizer, tasks, trainer.eval_max_new_tokens, batch_size=50
    )
    return evaluate.score(trainer.env, trainer.rubric, tasks, answers, name)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, print the table; exit 2 on bad input."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. run.seed=1")
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument(
        "--sft-only",
        type=float,
        metavar="MINUTES",
        help="comparison run: no RL; SFT on oracle demonstrations for MINUTES of wall time instead",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.recipe, args.overrides, resolve=plugins.resolve)
        t_setup = time.perf_counter()
        trainer = Trainer(cfg)
        if trainer.start_step:
            print(
                f"error: {cfg.run.output_dir} already holds a run; use a new run.output_dir=...",
                file=sys.stderr,
            )
            return 2
        setup_s = time.perf_counter() - t_setup
        tasks = trainer.env.tasks(cfg.eval.split, cfg.eval.n, seed=0)  # one held-out set for every seed

        t0 = time.perf_counter()
        results = [model_row(trainer, tasks, "base model")]
        eval_s = time.perf_counter() - t0  # the final evaluation costs about as much
        baselines = evaluate.baseline_results(trainer.env, trainer.rubric, tasks)
        results += [
            b for b in (evaluate.best_of(baselines, "constant"), evaluate.best_of(baselines, "only_")) if b
        ]
        if args.sft_only:
            from rltk.warmstart import warm_start

            budget = 60 * args.sft_only - (time.perf_counter() - t0) - eval_s
            cfg.warmstart.steps = 2_000  # an upper bound: the time budget ends it (~3 s a step on 2 cores)
            metrics = warm_start(trainer, max_seconds=budget)
            results.append(model_row(trainer, tasks, f"SFT only ({metrics['warmstart/step']:.0f} steps)"))
        else:
            if cfg.warmstart.enabled:
                run_warm_start(trainer)
                results.append(model_row(trainer, tasks, "after warm start"))
            trainer.train()
            results.append(model_row(trainer, tasks, "after RL"))
        minutes = (time.perf_counter() - t0) / 60
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"\nheld-out {cfg.eval.split} split, {len(tasks)} tasks, greedy, one sample, "
        f"training seed {cfg.run.seed}"
    )
    print(evaluate.format_table(results))
    print(f"\ntraining + evaluation: {minutes:.1f} min (model load/set-up {setup_s:.0f} s, not counted)")
    final = results[-1]
    for row in results[:-1]:
        print(f"{final.name} vs {row.name}: {100 * (final.accuracy - row.accuracy):+.1f} points")
    evaluate.write_report(
        Path(cfg.run.output_dir) / "eval.json",
        results,
        {"env": cfg.env.name, "split": cfg.eval.split, "n": len(tasks), "minutes": minutes},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
