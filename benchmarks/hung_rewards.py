"""What hung reward calls cost a step: the rubric's scoring time with k hung calls against none.

    python benchmarks/hung_rewards.py [--timeout 2.0] [--workers 2] [--ks 1 3] [--out FILE]

A rubric of one reward scores 32 rollouts (8 tasks x 4) through the worker pool (:mod:`rltk.workers`). The
reward hangs on k of them, one way per call in turn: stuck in C code (``sum(itertools.repeat(0))``, out of
reach of any signal), ignoring SIGTERM and every exception, and sleeping 1000 s. Each hung call is killed at
``--timeout`` and fails its rollout; the calls queued behind it run on a live worker. The bound issue 13
asks for is ``ceil(k / W) * timeout + 2 s`` over a step without hung calls. Prints the figures and writes
JSON (default benchmarks/results/hung_rewards.json). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rltk_envs.policy_flagging import PolicyFlaggingEnv

from rltk.batch import Group, Rollout
from rltk.reward import Rubric, RubricItem, reward_fn

KINDS = ("c_stuck", "ignores_sigterm", "sleeps")


@reward_fn(range=(0.0, 1.0))
def hangs_on_request(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """1.0, unless the completion names a way to hang."""
    if completion == "c_stuck":
        sum(itertools.repeat(0))
    if completion == "ignores_sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            with contextlib.suppress(BaseException):
                time.sleep(1)
    if completion == "sleeps":
        time.sleep(1000)
    return 1.0


def groups_with(hung: int) -> list[Group]:
    empty = torch.zeros(0, dtype=torch.long)
    tasks = PolicyFlaggingEnv().tasks("eval", 8)
    groups = [
        Group(t, empty, [Rollout(t, ["ok"], empty, empty, empty.float()) for _ in range(4)]) for t in tasks
    ]
    for i in range(hung):
        groups[i].rollouts[0].turns = [KINDS[i % len(KINDS)]]
    return groups


def timed(rubric: Rubric, groups: list[Group]) -> float:
    t0 = time.perf_counter()
    rubric.score(groups)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "hung_rewards.json"))
    args = parser.parse_args()
    rubric = Rubric([RubricItem("hangs", hangs_on_request)], timeout_s=args.timeout, workers=args.workers)
    rows = []
    try:
        timed(rubric, groups_with(0))  # forks the workers
        normal = min(timed(rubric, groups_with(0)) for _ in range(3))
        for k in args.ks:
            groups = groups_with(k)
            seconds = timed(rubric, groups)
            failed = sum(r.failed for g in groups for r in g.rollouts)
            bound = math.ceil(k / args.workers) * args.timeout + 2.0
            rows.append(
                {"k": k, "step_s": seconds, "extra_s": seconds - normal, "bound_s": bound, "failed": failed}
            )
            print(
                f"k={k}: {seconds:.2f} s, {seconds - normal:+.2f} s over none "
                f"(bound {bound:.1f} s), {failed} rollouts failed"
            )
    finally:
        rubric.close()
    print(f"no hung call: {1000 * normal:.1f} ms for 32 calls")
    result = {
        "timeout_s": args.timeout,
        "workers": args.workers,
        "normal_s": normal,
        "rows": rows,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
