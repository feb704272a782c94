"""Step time (sampling and update apart) and peak memory of recipes × samplers × dtypes, in one run.

    python benchmarks/step_matrix.py --out benchmarks/results/step_matrix.json
    python benchmarks/step_matrix.py --backends hf --dtypes float32 --cases support_refund

Each combination runs :mod:`benchmarks.multiturn_step` in its own process (``--warmup`` untimed steps, then
``--steps`` timed ones), so one combination's memory never counts against another's. Peak memory is the
largest resident set of the whole process tree, sampled every 0.2 s: with ``rollout.backend=vllm`` the vLLM
worker is a child process whose memory ``ru_maxrss`` would not show (:class:`TreeRss` also sums
proportional set sizes, which count the pages a forked reward worker shares with the trainer once). Run it
alone on the machine: two CPU-heavy processes on 2 cores halve each other.

Cases: ``quickstart`` (recipes/quickstart.yaml, single-turn) and ``support_refund`` (recipes/
support_refund_grpo.yaml at P=2, G=8: five-turn tool episodes of ~660 tokens, the step whose memory the
issue measured at 11.7 GiB); ``support_refund_ckpt`` is that step with gradient checkpointing (and the
packed shared-prompt forward it needs); ``support_refund_rows2`` trains on 2 rollouts of a group per
micro-batch (``optim.rollouts_per_micro_batch``); ``support_refund_lowmem`` adds gradient checkpointing and a
0.5 GiB vLLM KV cache to that; ``support_refund_lowmem_kv03`` shrinks the KV cache to 0.3 GiB and keeps one
reward worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

HERE = Path(__file__).resolve().parent
LOWMEM = [  # 2 rollouts per micro-batch, recomputed activations, a 0.5 GiB vLLM KV cache
    "recipes/support_refund_grpo.yaml",
    "rollout.prompts_per_step=2",
    "rollout.group_size=8",
    "optim.rollouts_per_micro_batch=2",
    "model.gradient_checkpointing=true",
    "algorithm.shared_prompt=packed",
    "rollout.vllm_kv_cache_gib=0.5",  # 16 five-turn episodes hold ~11k tokens: 0.25 GiB in bf16
]
CASES = {
    "quickstart": ["recipes/quickstart.yaml"],
    "support_refund": [
        "recipes/support_refund_grpo.yaml",
        "rollout.prompts_per_step=2",
        "rollout.group_size=8",
    ],
    "support_refund_ckpt": [  # the same step with activations recomputed layer by layer in the backward
        "recipes/support_refund_grpo.yaml",
        "rollout.prompts_per_step=2",
        "rollout.group_size=8",
        "model.gradient_checkpointing=true",
        "algorithm.shared_prompt=packed",
    ],
    "support_refund_rows2": [  # the update's micro-batches hold 2 rollouts of a group, not all 8
        "recipes/support_refund_grpo.yaml",
        "rollout.prompts_per_step=2",
        "rollout.group_size=8",
        "optim.rollouts_per_micro_batch=2",
    ],
    "support_refund_lowmem": LOWMEM,
    "support_refund_lowmem_kv03": [  # lowmem with a 0.3 GiB KV cache and one reward worker
        *LOWMEM[:-1],
        "rollout.vllm_kv_cache_gib=0.3",
        "rollout.reward_workers=1",
    ],
}


class TreeRss:
    """Peak memory of a process and its descendants, sampled in a thread.

    ``peak``: resident set (RSS) of the whole tree, summed; ``peak_root``: of the process alone (the
    trainer); ``peak_children``: of its descendants together (the vLLM worker, reward workers);
    ``peak_vllm``: of the vLLM worker alone. A summed RSS counts twice the pages a forked reward worker still
    shares with the trainer, so ``peak_pss`` also sums each process's proportional set size (a shared page
    split between its sharers): the memory the tree really holds.
    """

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.root, self.every_s = psutil.Process(pid), every_s
        self.peak = self.peak_root = self.peak_children = self.peak_vllm = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        root = self.root.memory_full_info()
        children = vllm = 0
        pss = root.pss
        for p in self.root.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a child that just exited
                mem = p.memory_full_info()
                children += mem.rss
                pss += mem.pss
                if any("vllm_worker" in part for part in p.cmdline()):
                    vllm += mem.rss
        self.peak = max(self.peak, root.rss + children)
        self.peak_root = max(self.peak_root, root.rss)
        self.peak_children = max(self.peak_children, children)
        self.peak_vllm = max(self.peak_vllm, vllm)
        self.peak_pss = max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except psutil.Error:
                return
            time.sleep(self.every_s)

    def stop(self) -> dict[str, float]:
        """Stop sampling; the peaks in GiB."""
        self._stop.set()
        self._thread.join()
        return {
            "peak_tree_rss_gib": self.peak / 2**30,
            "peak_tree_pss_gib": self.peak_pss / 2**30,
            "peak_trainer_rss_gib": self.peak_root / 2**30,
            "peak_children_rss_gib": self.peak_children / 2**30,
            "peak_vllm_worker_rss_gib": self.peak_vllm / 2**30,
        }


def run_case(case: str, backend: str, dtype: str, steps: int, warmup: int, threads: int) -> dict:
    """One combination in its own process; its per-step figures and the tree's peak memory."""
    recipe, *overrides = CASES[case]
    with tempfile.TemporaryDirectory(prefix="rltk-matrix-") as tmp:
        out = Path(tmp) / "steps.json"
        cmd = [
            sys.executable,
            str(HERE / "multiturn_step.py"),
            recipe,
            *overrides,
            f"rollout.backend={backend}",
            f"model.dtype={dtype}",
            "eval.every=0",
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--threads",
            str(threads),
            "--out",
            str(out),
        ]
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        rss = TreeRss(proc.pid)
        log, _ = proc.communicate()
        peak = rss.stop()
        row = {"case": case, "backend": backend, "dtype": dtype, "wall_s": time.perf_counter() - start}
        if proc.returncode != 0:
            return {
                **row,
                "error": log.strip().splitlines()[-1] if log.strip() else f"exit {proc.returncode}",
            }
        steps_run = json.loads(out.read_text())["steps"]
        mean = {k: sum(s[k] for s in steps_run) / len(steps_run) for k in steps_run[0] if k != "peak_rss_gib"}
        return {**row, **peak, "mean": mean, "steps": steps_run}


def main(argv: list[str] | None = None) -> int:
    """Run every combination asked for, print a table, write JSON with ``--out``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", default=["quickstart", "support_refund"], choices=list(CASES))
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for case in args.cases:
        for backend in args.backends:
            for dtype in args.dtypes:
                row = run_case(case, backend, dtype, args.steps, args.warmup, args.threads)
                rows.append(row)
                if "error" in row:
                    print(f"{case:15s} {backend:5s} {dtype:9s} failed: {row['error']}", flush=True)
                    continue
                m = row["mean"]
                print(
                    f"{case:15s} {backend:5s} {dtype:9s} step {m['time/step_s']:6.1f} s "
                    f"(sampling {m['time/generate_s']:6.1f} s, update {m['time/update_s']:6.1f} s), "
                    f"peak RSS {row['peak_tree_rss_gib']:5.2f} GiB, PSS {row['peak_tree_pss_gib']:5.2f} "
                    f"(trainer {row['peak_trainer_rss_gib']:5.2f}, "
                    f"children {row['peak_children_rss_gib']:5.2f}, "
                    f"vLLM {row['peak_vllm_worker_rss_gib']:5.2f})",
                    flush=True,
                )
    if args.out:
        meta = {
            "machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
            "steps": args.steps,
            "warmup": args.warmup,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
