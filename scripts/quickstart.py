"""Quickstart: RL on the embedded SmolLM2-135M-Instruct for policy-compliance flagging, on a CPU.

Trains with ``recipes/quickstart.yaml`` (plus any ``key=value`` overrides), whose ``eval.report`` makes
``rltk train`` end with the proof report on the held-out eval split: the base model, the model after the
warm start and after RL (greedy on every task; sampled pass@k, pass^k and best-of-N on the first
``eval.report.sampled_tasks``), beside the env's teacher (the workflow the model replaces), its oracle and
its best trivial policy. Prints the report's summary, and the SFT-only row of the committed report
(``docs/reports/policy_flagging``: SFT alone for the same wall time), and writes the report into the run dir.

    python scripts/quickstart.py [run.seed=1] [run.output_dir=runs/qs-seed1]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from rltk import plugins, report_render
from rltk.config import load_config
from rltk.errors import user_errors
from rltk.pipeline import run

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"
COMMITTED = ROOT / "docs" / "reports" / "policy_flagging" / "report.json"


def committed_sft_only() -> str:
    """The SFT-only row of the committed report, as one line (or why there is none)."""
    if not COMMITTED.is_file():
        return f"(no committed report at {COMMITTED.relative_to(ROOT)} for the SFT-only row)"
    built = json.loads(COMMITTED.read_text())
    row = next((p for p in built["policies"] if p["name"] == "sft_only"), None)
    if row is None:
        return f"(the committed report {COMMITTED.relative_to(ROOT)} has no sft_only row)"
    g = row["greedy"]
    low, high = g["ci95"]
    return (
        f"SFT alone for the same wall time (committed report, training seed 0, {g['tasks']} tasks): "
        f"{100 * g['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] greedy ({row['source']})"
    )


def main(argv: list[str] | None = None) -> int:
    """Train, print the report; exit 2 on bad input."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. run.seed=1")
    parser.add_argument("--recipe", default=str(RECIPE))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.recipe, ["eval.report.enabled=true", *args.overrides], resolve=plugins.resolve)
        if Path(cfg.run.output_dir, "config.yaml").is_file():
            print(
                f"error: {cfg.run.output_dir} already holds a run; use a new run.output_dir=...",
                file=sys.stderr,
            )
            return 2
        t0 = time.perf_counter()
        run(cfg)
        minutes = (time.perf_counter() - t0) / 60
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.run.output_dir) / "report"
    built = json.loads((out / "report.json").read_text())
    print(f"\nheld-out {cfg.eval.split} split, {built['tasks']} tasks, training seed {cfg.run.seed}\n")
    print(report_render.summary(built))
    print(f"\n{committed_sft_only()}")
    print(f"\ntraining + report: {minutes:.1f} min (model load included); full report: {out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
