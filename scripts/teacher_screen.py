"""Before any RL attempt from a teacher warm start: can the warm-started model sample the teacher's fixes?

    python scripts/teacher_screen.py recipes/invoice_extraction_teacher.yaml [key=value ...] [--tasks 16]

Runs the recipe's warm start on the teacher's demonstrations (``warmstart.demos: teacher``), then samples
``--group`` episodes at the recipe's temperature of each of ``--tasks`` eval tasks the teacher gets wrong
(its error slice) and counts the groups with at least one success. RL learns only from groups with a
success: when fewer than ~20% have one, RL has nothing to learn from, and the teacher or the start must
change first. Prints the figures and writes them as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rltk.config import load_config  # noqa: E402
from rltk.env import solves  # noqa: E402
from rltk.pipeline import run_warm_start  # noqa: E402
from rltk.rollout import generate  # noqa: E402
from rltk.trainer import Trainer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Warm-start, sample the teacher's error slice, print and write the screen's figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    ap.add_argument("--tasks", type=int, default=16, help="teacher-wrong eval tasks sampled")
    ap.add_argument("--group", type=int, default=8, help="samples per task (G)")
    ap.add_argument("--pool", type=int, default=200, help="eval tasks searched for the teacher's errors")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out_dir = f"run.output_dir=runs/teacher_screen/{Path(args.recipe).stem}"
    # the HF sampler: sampling a few groups once does not pay for starting a vLLM engine
    fixed = ["eval.report.enabled=false", "rollout.backend=hf"]
    cfg = load_config(args.recipe, [out_dir, *args.overrides, *fixed])
    trainer = Trainer(cfg)
    start = time.perf_counter()
    run_warm_start(trainer)  # a finished screen's output dir resumes: its warm start is reused
    warm_s = time.perf_counter() - start
    env, teacher = trainer.env, trainer.env.teacher()
    if teacher is None:
        print(f"error: env '{env.name}' ships no teacher", file=sys.stderr)
        return 2
    pool = env.tasks("eval", args.pool, seed=0)
    all_wrong = [t for t in pool if not solves(env, t, teacher)]
    wrong = all_wrong[: args.tasks]
    groups = generate(
        trainer.policy.lm,
        trainer.tokenizer,
        env,
        wrong,
        group_size=args.group,
        max_new_tokens=cfg.rollout.max_new_tokens,
        max_turns=cfg.rollout.max_turns,
        temperature=cfg.rollout.temperature,
        seed=cfg.run.seed,
    )
    rates = [sum(bool(r.outcome["correct"]) for r in g.rollouts) / len(g.rollouts) for g in groups]
    figures = {
        "recipe": args.recipe,
        "overrides": args.overrides,
        "warmstart_steps": cfg.warmstart.steps,
        "warmstart_s": round(warm_s, 1),
        "teacher_wrong": f"{len(all_wrong)} of {len(pool)} eval tasks",
        "tasks": len(groups),
        "group_size": args.group,
        "temperature": cfg.rollout.temperature,
        "groups_with_a_success": sum(r > 0 for r in rates),
        "per_sample_success": sum(rates) / max(1, len(rates)),
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
