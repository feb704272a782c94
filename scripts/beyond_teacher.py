"""RL beyond the workflow it learned from: one recipe's whole comparison, one seed, one command.

    python scripts/beyond_teacher.py recipes/invoice_extraction_teacher.yaml --seed 1 --split test --n 400

The recipe warm-starts on the env teacher's demonstrations (``warmstart.demos: teacher``: the logs of the
workflow the model replaces, its errors included) and then trains RL on the env's verified outcome. Runs, one
after another (each alone on the CPU, so their wall times compare), into ``--runs`` (default
``runs/beyond_teacher/<recipe>-s<seed>``):

1. ``rl``: the recipe as it is (warm start, then RL); its ``train_time.json`` is the budget of the others.
2. ``sft``: SFT alone on the teacher's demonstrations for the same training wall time
   (``warmstart.equal_time_as``). With the constant warm-start schedule and prefix-stable demonstration
   tasks its first steps are the RL run's warm start: it is that run continued, the later checkpoint of one
   SFT-on-teacher run at equal wall time.
3. ``sft_verified``: the same, on the teacher's demonstrations the env verifies correct
   (``warmstart.verified_only``): SFT that sees the verifier RL sees.

Then ``rltk eval --compare`` writes the proof report into ``--out`` (default
``docs/reports/beyond_teacher/<env>/seed<seed>``): the base model (greedy, sampled, best-of-N), the warm
start (``rl@0``), SFT alone, outcome-filtered SFT and warm start + RL, beside the teacher, the oracle and the
best trivial policy, with paired bootstrap intervals of the RL model against every row; ``runs.json`` beside
it gives each run's training seconds and steps. A finished run is not trained again (an interrupted one
resumes) and the report keeps each model's row as soon as it is played, so the command can be rerun after
a stop. Extra ``key=value`` arguments override the recipe in
all three runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rltk.config import TRAIN_TIME_FILE, load_config  # noqa: E402
from rltk.errors import user_errors  # noqa: E402

SFT_STEPS_BOUND = 100_000  # SFT-only runs stop on their time budget long before this


def rltk(*args: str) -> None:
    """Run one ``rltk`` command in its own process (each training alone, its memory freed after)."""
    cmd = [sys.executable, "-m", "rltk.cli", *args]
    print("$ rltk", " ".join(args), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def train(recipe: str, run_dir: Path, overrides: list[str]) -> dict:
    """Train one run unless it finished already; returns its ``train_time.json``."""
    if not (run_dir / TRAIN_TIME_FILE).is_file():
        rltk("train", recipe, *overrides, f"run.output_dir={run_dir}")
    return json.loads((run_dir / TRAIN_TIME_FILE).read_text())


def sft_steps(run_dir: Path) -> int:
    """The SFT steps a run's warm start made (from its metrics)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return max(int(r["warmstart/step"]) for r in rows if "warmstart/step" in r)


def main(argv: list[str] | None = None) -> int:
    """Train the three runs of one seed, then write the proof report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for all three runs")
    ap.add_argument("--seed", type=int, default=0, help="training seed (run.seed)")
    ap.add_argument("--split", default="test", choices=["eval", "test"], help="held-out split of the report")
    ap.add_argument("--n", type=int, default=400, help="held-out tasks in the report")
    ap.add_argument("--samples", type=int, default=8, help="samples per task (pass@k, pass^k, best-of-N)")
    ap.add_argument("--sampled-n", type=int, default=100, help="tasks sampled (the first N)")
    ap.add_argument("--runs", type=Path, help="the runs' dir (default runs/beyond_teacher/<recipe>-s<seed>)")
    ap.add_argument("--out", type=Path, help="report dir (default docs/reports/beyond_teacher/<env>/seed<N>)")
    args = ap.parse_args(argv)
    common = [*args.overrides, f"run.seed={args.seed}"]
    try:
        cfg = load_config(args.recipe, common)
    except user_errors() as exc:  # a bad recipe or override: its message names the fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if cfg.warmstart.demos != "teacher" or not cfg.warmstart.enabled:
        why = "the recipe must warm-start on the teacher"
        print(f"error: {why}: set warmstart.enabled=true warmstart.demos=teacher", file=sys.stderr)
        return 2
    runs = args.runs or ROOT / "runs" / "beyond_teacher" / f"{Path(args.recipe).stem}-s{args.seed}"
    out = args.out or ROOT / "docs" / "reports" / "beyond_teacher" / cfg.env.name / f"seed{args.seed}"
    rl = train(args.recipe, runs / "rl", common)
    sft_only = [f"warmstart.equal_time_as={runs / 'rl'}", f"warmstart.steps={SFT_STEPS_BOUND}"]
    sft_only.append("eval.every=0")  # the report evaluates every row on the same tasks
    sft = train(args.recipe, runs / "sft", [*common, *sft_only])
    verified = train(args.recipe, runs / "sft_verified", [*common, *sft_only, "warmstart.verified_only=true"])
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": args.recipe,
        "overrides": common,
        "rl": {**rl, "warmstart_steps": cfg.warmstart.steps},
        "sft": {**sft, "warmstart_steps": sft_steps(runs / "sft")},
        "sft_verified": {**verified, "warmstart_steps": sft_steps(runs / "sft_verified")},
    }
    (out / "runs.json").write_text(json.dumps(record, indent=2) + "\n")
    rltk(
        "eval",
        "--env",
        cfg.env.name,
        "--split",
        args.split,
        "--n",
        str(args.n),
        "--samples",
        str(args.samples),
        "--sampled-n",
        str(args.sampled_n),
        "--temperature",
        str(cfg.rollout.temperature),
        "--backend",
        cfg.rollout.backend,
        "--out",
        str(out),
        "--compare",
        f"base={cfg.model.name}",
        f"warm_start={runs / 'rl'}@0",
        f"sft_only={runs / 'sft'}",
        f"sft_verified={runs / 'sft_verified'}",
        f"rl={runs / 'rl'}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
