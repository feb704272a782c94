"""What a proof report costs per env: seconds and tokens per task of one model row, and the whole report.

    python benchmarks/report_cost.py [--envs policy_flagging invoice_extraction ...] [--model NAME]
        [--greedy 32] [--sampled 8] [--out benchmarks/results/report_cost.json]

For each env (at its recipe's options) it plays ``--greedy`` eval tasks greedily and ``--sampled`` tasks with
the report's n samples (the issue's sizes: 8 for single-turn envs, 4 for multi-turn), through the same
:func:`rltk.report.evaluate_model` the report uses, and prints seconds and tokens per task. It then
extrapolates one model row of a report at the committed sizes (400 tasks for ``policy_flagging``, 200 for
``invoice_extraction``, 100 for the multi-turn envs; every task sampled) and a five-row report (base, base
best-of-N from the same samples, teacher and two trained models: three model rows). A trained model's
answers are shorter than a base model's that runs to its token limit, so the base model's figures are the
upper end. Writes JSON. Run it on a quiet machine: it is a timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from rltk import plugins, report
from rltk.config import load_config
from rltk.models import load_model, load_tokenizer
from rltk.reward import Rubric

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"policy_flagging": (400, 8), "invoice_extraction": (200, 8)}  # tasks, samples; others: (100, 4)
RECIPES = {
    "policy_flagging": "quickstart.yaml",
    "invoice_extraction": "invoice_extraction_grpo.yaml",
    "doc_search_qa": "doc_search_qa_grpo.yaml",
    "sql_analytics": "sql_analytics_grpo.yaml",
    "support_refund": "support_refund_grpo.yaml",
}
MODEL_ROWS = 3  # base (its best-of-N comes from the same samples) and two trained models


def measure(env_name: str, model_name: str, greedy: int, sampled: int) -> dict:
    """Time one model row of ``env_name``'s report on a few tasks and extrapolate to the committed sizes."""
    cfg = load_config(ROOT / "recipes" / RECIPES[env_name], [])
    env = plugins.make_env(env_name, cfg.env.options)
    tasks_full, n = SIZES.get(env_name, (100, 4))
    max_new = cfg.eval.max_new_tokens or env.max_new_tokens
    settings = report.ReportSettings(samples=n, sampled_tasks=sampled, bon=n, max_new_tokens=max_new)
    model, tokenizer = load_model(model_name), load_tokenizer(model_name)
    rubric = Rubric.from_config([], env)
    tasks = env.tasks("eval", max(greedy, sampled))[:greedy]
    try:
        t0 = time.perf_counter()
        row = report.evaluate_model(model, tokenizer, env, rubric, tasks, settings, "base", model_name)
        wall = time.perf_counter() - t0
    finally:
        rubric.close()
    greedy_s = row.seconds["greedy"] / len(row.greedy)
    sampled_s = row.seconds.get("sampled", 0.0) / max(1, len(row.samples or []))
    flat = [a for r in row.samples or [] for a in r]
    row_min = (greedy_s + sampled_s) * tasks_full / 60
    return {
        "env": env_name,
        "options": dict(cfg.env.options),
        "max_new_tokens": max_new,
        "measured_tasks": {"greedy": len(row.greedy), "sampled": len(row.samples or []), "samples": n},
        "seconds_per_task": {"greedy": greedy_s, "sampled_n": sampled_s},
        "generated_tokens_per_episode": {
            "greedy": sum(a.generated_tokens or 0 for a in row.greedy) / len(row.greedy),
            "sampled": sum(a.generated_tokens or 0 for a in flat) / max(1, len(flat)),
        },
        "context_tokens_per_episode": sum(a.context_tokens or 0 for a in row.greedy) / len(row.greedy),
        "committed_size": {"tasks": tasks_full, "samples": n},
        "minutes_per_model_row": row_min,
        "minutes_per_report": MODEL_ROWS * row_min,
        "wall_s": wall,
    }


def main() -> None:
    """Measure every env asked for; print a table; write JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--envs", nargs="+", default=list(RECIPES))
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--greedy", type=int, default=32, help="tasks played greedily")
    parser.add_argument("--sampled", type=int, default=8, help="tasks sampled n times")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "report_cost.json"))
    args = parser.parse_args()
    rows = [measure(e, args.model, args.greedy, args.sampled) for e in args.envs]
    head = ("env", "greedy s/task", "sampled s/task", "tokens/ep", "min/row", "min/report")
    print("  ".join(f"{h:>14s}" for h in head))
    for r in rows:
        secs = r["seconds_per_task"]
        cells = (secs["greedy"], secs["sampled_n"], r["generated_tokens_per_episode"]["sampled"])
        cells += (r["minutes_per_model_row"], r["minutes_per_report"])
        print(f"{r['env']:>14s}  " + "  ".join(f"{c:14.2f}" for c in cells))
    meta = {"model": args.model, "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    Path(args.out).write_text(json.dumps({**meta, "envs": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
