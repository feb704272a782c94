"""Time RL steps of a multi-turn (tool-use) recipe: sampling vs update, tokens, turns, peak memory.

    python benchmarks/multiturn_step.py recipes/support_refund_grpo.yaml rollout.prompts_per_step=2 \
        rollout.group_size=8 --steps 2 --out benchmarks/results/multiturn_step.json

Runs ``--steps`` RL steps of the recipe (no warm start, nothing saved) after ``--warmup`` untimed ones and
prints, per step, the wall time split into sampling (all turns of all rollouts) and update (forward +
backward + optimizer), the prompt and completion tokens (completion = model turns + env answers), the mean
number of turns, and the process's peak resident memory. Writes the figures as JSON with ``--out``. This is
the yardstick for making multi-turn steps faster: the 60-minute RL budget of the tool-use recipes is spent
here.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
from pathlib import Path

import torch

from rltk import plugins
from rltk.config import load_config
from rltk.trainer import Trainer

KEYS = (
    "time/step_s",
    "time/generate_s",
    "time/update_s",
    "tokens/prompt_mean",
    "tokens/completion_mean",
    "rollout/turns_mean",
    "rollout/stopped_max_turns",
    "reward/mean",
)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    """Run the steps and print the figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. rollout.group_size=4")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="rltk-bench-") as run_dir:
        overrides = [
            *args.overrides,
            f"run.output_dir={run_dir}",
            "run.resume=never",
            "run.save_every=0",
            f"run.steps={args.steps + args.warmup}",
            f"run.threads={args.threads}",
            "warmstart.enabled=false",
        ]
        cfg = load_config(args.recipe, overrides, resolve=plugins.resolve)
        trainer = Trainer(cfg)
        rows = []
        for step in range(args.steps + args.warmup):
            metrics = trainer.step(step).metrics
            if step >= args.warmup:
                row = {k: float(metrics[k]) for k in KEYS if k in metrics}
                row["peak_rss_gib"] = peak_rss_gib()
                rows.append(row)
                r = row
                print(
                    f"step {step + 1}: {r['time/step_s']:.1f} s (sampling {r['time/generate_s']:.1f} s, "
                    f"update {r['time/update_s']:.1f} s), prompt {r['tokens/prompt_mean']:.0f} + completion "
                    f"{r['tokens/completion_mean']:.0f} tokens, {r.get('rollout/turns_mean', 1):.1f} turns, "
                    f"peak RSS {r['peak_rss_gib']:.1f} GiB",
                    flush=True,
                )
    if args.out:
        report = {
            "recipe": args.recipe,
            "overrides": args.overrides,
            "env": cfg.env.name,
            "env_options": cfg.env.options,
            "prompts_per_step": cfg.rollout.prompts_per_step,
            "group_size": cfg.rollout.group_size,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "groups_per_micro_batch": cfg.optim.groups_per_micro_batch,
            "threads": args.threads,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "steps": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
