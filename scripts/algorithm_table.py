"""GRPO, RLOO and PPO on one env from one warm start, at equal steps and seeds: the README's algorithm table.

    python scripts/algorithm_table.py                    # every run not yet complete, then the table
    python scripts/algorithm_table.py --table-only       # the table from the runs already made

Each (algorithm, seed) is one ``rltk train`` of ``recipes/invoice_extraction_grpo.yaml`` (easy) with an
8-step warm start, ``--steps`` RL steps of 8 prompts x 8 samples and held-out greedy evals of 200 tasks at
step 0 (the warm start) and at the end; runs are made one after another (each alone on the CPU).
``ppo_frozen_critic`` is PPO with ``vf_coef=0``: its value head stays at zero, so GAE sees no baseline (the
critic ablation: with λ = 1, REINFORCE on the whitened outcome); ``ppo_lam095`` is PPO with GAE's λ = 0.95
(the preset before this table: TRL's default), ``ppo_lam095_frozen_critic`` the same without the critic;
``ppo_critic_lr`` gives the critic a 10x learning rate (``algorithm.critic_lr=1e-3``).

The table reads each run's ``evals/step_*.jsonl`` (per-task verdicts): final accuracy with its bootstrap 95%
interval over tasks, the gain over the same seed's warm start with a paired interval, and the mean over seeds
with a paired interval on the seed-averaged per-task gains (eval noise only: two seeds do not bound the
seed-to-seed spread). PPO rows add the critic's explained variance on each step's fresh rollouts (before
that step's update), averaged over the second half of the steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rltk.estimators import bootstrap_mean, paired_difference  # noqa: E402

RECIPE = "recipes/invoice_extraction_grpo.yaml"
ALGORITHMS = {
    "grpo": ["algorithm.name=grpo"],
    "rloo": ["algorithm.name=rloo"],
    "ppo": ["algorithm.name=ppo"],
    "ppo_critic_lr": ["algorithm.name=ppo", "algorithm.critic_lr=1e-3"],
    "ppo_frozen_critic": ["algorithm.name=ppo", "algorithm.vf_coef=0"],
    "ppo_lam095": ["algorithm.name=ppo", "algorithm.lam=0.95"],
    "ppo_lam095_frozen_critic": ["algorithm.name=ppo", "algorithm.lam=0.95", "algorithm.vf_coef=0"],
}
COMMON = [
    "env.options.difficulty=easy",
    "warmstart.steps=8",
    "rollout.backend=vllm",
    "model.dtype=bfloat16",
    "eval.n=200",
    "run.keep_last_n=2",
]


def overrides(algorithm: str, seed: int, steps: int, runs: Path) -> list[str]:
    """The ``key=value`` overrides of one run."""
    return [
        *COMMON,
        *ALGORITHMS[algorithm],
        f"run.seed={seed}",
        f"run.steps={steps}",
        f"run.save_every={steps}",
        f"eval.every={steps}",
        f"run.output_dir={runs / f'{algorithm}-s{seed}'}",
    ]


def train(algorithm: str, seed: int, steps: int, runs: Path) -> None:
    """Make one run unless its final eval is already written (an interrupted run resumes)."""
    run_dir = runs / f"{algorithm}-s{seed}"
    if (run_dir / "evals" / f"step_{steps:06d}.jsonl").is_file():
        return
    cmd = [sys.executable, "-m", "rltk.cli", "train", RECIPE, *overrides(algorithm, seed, steps, runs)]
    print("$", " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    minutes = (time.perf_counter() - start) / 60
    (run_dir / "wall_minutes.json").write_text(json.dumps({"minutes": minutes}))


def correct(run_dir: Path, step: int) -> list[float]:
    """Per-task verdicts (1/0) of the run's eval at ``step``, in task order."""
    rows = [json.loads(x) for x in (run_dir / "evals" / f"step_{step:06d}.jsonl").read_text().splitlines()]
    return [float(r["correct"]) for r in rows]


def over_steps(
    run_dir: Path, key: str, how: Callable[[list[float]], float] = np.mean, last: float = 1.0
) -> float | None:
    """A per-step metric summarised over the ``last`` share of the run's steps (``None`` if never logged)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if key in r and "eval/accuracy" not in r]
    values = values[len(values) - max(1, round(last * len(values))) :]
    return float(how(values)) if values else None


def row(algorithm: str, seeds: list[int], steps: int, runs: Path) -> dict:
    """One algorithm's figures over the seeds it has finished runs of."""
    per_seed, gains = [], []
    for seed in seeds:
        run_dir = runs / f"{algorithm}-s{seed}"
        if not (run_dir / "evals" / f"step_{steps:06d}.jsonl").is_file():
            continue  # not made (a diagnostic run of one seed): a blank cell in the table
        start, final = correct(run_dir, 0), correct(run_dir, steps)
        gains.append(np.asarray(final) - np.asarray(start))
        wall = run_dir / "wall_minutes.json"
        per_seed.append(
            {
                "seed": seed,
                "warm_start": bootstrap_mean(start),
                "final": bootstrap_mean(final),
                "gain": paired_difference(final, start),
                "step_s": over_steps(run_dir, "time/step_s", np.median),  # robust to a step slowed by others
                "explained_variance": over_steps(run_dir, "critic/explained_variance", last=0.5),
                "minutes": json.loads(wall.read_text())["minutes"] if wall.is_file() else None,
            }
        )
    return {
        "algorithm": algorithm,
        "seeds": per_seed,
        "mean_final": float(np.mean([s["final"][0] for s in per_seed])),
        "mean_gain": bootstrap_mean(np.mean(gains, axis=0)),  # over the seeds made
    }


def pct(x: tuple[float, float, float], sign: bool = False) -> str:
    """``62.0% [55.0, 68.5]``, or with a sign for differences (points)."""
    mean, low, high = (100 * v for v in x)
    return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]" if sign else f"{mean:.1f}% [{low:.1f}, {high:.1f}]"


def markdown(rows: list[dict], seeds: list[int], steps: int) -> str:
    """The README table; a seed an algorithm was not run with is ``—``."""
    head = ["algorithm", *(f"seed {s}: warm start → step {steps}" for s in seeds)]
    head += [*(f"gain, seed {s}" for s in seeds), "mean gain", "median s / step"]
    head += ["explained variance (2nd half)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        by_seed = {s["seed"]: s for s in r["seeds"]}
        ss = [by_seed.get(seed) for seed in seeds]
        made = [s for s in ss if s]
        ev = [s["explained_variance"] for s in made]
        cells = [r["algorithm"]]
        cells += [f"{100 * s['warm_start'][0]:.1f}% → {pct(s['final'])}" if s else "—" for s in ss]
        cells += [pct(s["gain"], sign=True) if s else "—" for s in ss]
        cells += [pct(r["mean_gain"], sign=True) if len(made) == len(seeds) else "—"]
        cells += [" / ".join(f"{s['step_s']:.1f}" for s in made)]
        cells += [" / ".join(f"{v:+.2f}" for v in ev) if all(v is not None for v in ev) else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Make the missing runs (unless ``--table-only``), then write ``table.json`` and ``table.md``."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "algorithms")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reports" / "algorithms")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        for seed in args.seeds:
            for algorithm in args.algorithms:
                train(algorithm, seed, args.steps, args.runs)
    rows = [row(a, args.seeds, args.steps, args.runs) for a in args.algorithms]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"recipe": RECIPE, "overrides": COMMON, "steps": args.steps, "seeds": args.seeds}
    (args.out / "table.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    table = markdown(rows, args.seeds, args.steps)
    (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
