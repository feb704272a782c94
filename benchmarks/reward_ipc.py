"""Per-step cost of running rewards in the worker pool (:mod:`rltk.workers`) against plain in-process calls.

    python benchmarks/reward_ipc.py [--steps 50] [--warmup 5] [--calls 64 256] [--workers 1 2] [--out FILE]

The reward is cheap and pure, so the figures are the pool's overhead: exact match of a 200-character
completion against a small reference dict, with a small outcome dict, as ``fn(completion, reference,
outcome)``. For each number of calls per step it times ``--steps`` steps (after ``--warmup`` untimed ones,
which also fork the workers) of a plain loop in this process and of ``WorkerPool.run`` with each number of
workers, and prints the median and 90th percentile milliseconds per step and the median microseconds per
call. Writes JSON (default benchmarks/results/reward_ipc.json). Run it on a quiet machine: the workers and
the parent share the cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rltk.workers import Call, WorkerPool


def exact_match(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    return float(completion.strip() == reference["answer"] and not outcome.get("error"))


def score_here(args: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> list[float]:
    return [exact_match(*a) for a in args]


def make_args(n: int) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """n distinct (completion, reference, outcome) triples, half of them matching."""
    args = []
    for i in range(n):
        completion = f"<answer>{i:04d}</answer> " + "x" * 177
        answer = completion.strip() if i % 2 == 0 else "<answer>none</answer>"
        reference = {"answer": answer, "task_id": f"task-{i}", "split": "train"}
        outcome = {"correct": i % 2 == 0, "error": None, "turns": 1}
        args.append((completion, reference, outcome))
    return args


def time_steps(step: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Seconds of each timed call of ``step`` (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def row(mode: str, workers: int, calls: int, times: list[float]) -> dict[str, Any]:
    median = statistics.median(times)
    return {
        "mode": mode,
        "workers": workers,
        "calls_per_step": calls,
        "step_ms_median": 1e3 * median,
        "step_ms_p90": 1e3 * statistics.quantiles(times, n=10)[-1],
        "us_per_call": 1e6 * median / calls,
        "steps_s": times,
    }


def main() -> None:
    """Time both ways for every calls/workers combination and print/write the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calls", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument("--note", default="", help="recorded in the JSON (e.g. what else ran on the machine)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "reward_ipc.json"))
    args = parser.parse_args()

    rows = []
    for n in args.calls:
        call_args = make_args(n)
        plain = time_steps(functools.partial(score_here, call_args), args.steps, args.warmup)
        rows.append(row("in-process", 0, n, plain))
        calls = [Call(0, x, {}) for x in call_args]
        for w in args.workers:
            with WorkerPool([exact_match], workers=w, tag="bench") as pool:
                step = functools.partial(pool.run, calls, args.timeout_s)
                rows.append(row("pool", w, n, time_steps(step, args.steps, args.warmup)))
    result = {
        "machine": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "note": args.note,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "note")},
        "rows": rows,
    }
    print(f"{'mode':12s} {'W':>2s} {'calls':>6s} {'ms/step':>9s} {'p90 ms':>9s} {'µs/call':>9s}")
    for r in rows:
        print(
            f"{r['mode']:12s} {r['workers']:2d} {r['calls_per_step']:6d} {r['step_ms_median']:9.2f} "
            f"{r['step_ms_p90']:9.2f} {r['us_per_call']:9.1f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
