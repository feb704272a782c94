"""Greedy parity of the vLLM sampler with the HF sampler on real envs, SmolLM2-135M in fp32.

    python benchmarks/greedy_parity.py                         # 200 eval tasks of each env
    python benchmarks/greedy_parity.py --n 20 --out /tmp/p.json

Plays the same held-out tasks greedily through ``rollout.generate`` twice, once with :class:`HFSampler` and
once with :class:`VLLMSampler` (whole episodes for multi-turn envs: env tokens included), and compares the
episodes token by token. Greedy decoding may legitimately differ only where two tokens tie: at each
episode's first differing token the HF forward's top-2 logit gap is measured, and ``ok`` is false if any
gap reaches ``TIE_GAP`` (or if the first difference is an env token, which only follows model tokens).
Prints one line per env and writes JSON (default ``benchmarks/results/greedy_parity.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rltk.models import load_model, load_tokenizer  # noqa: E402
from rltk.plugins import make_env  # noqa: E402
from rltk.rollout import generate  # noqa: E402
from rltk.vllm_sampler import VLLMSampler  # noqa: E402

TIE_GAP = 1e-4
ENVS = {"invoice_extraction": {"difficulty": "easy"}, "support_refund": {}}


def top2_gap(model: torch.nn.Module, ids: list[int]) -> float:
    """The HF forward's gap between its two largest next-token logits after ``ids``."""
    with torch.no_grad():
        top = model(input_ids=torch.tensor([ids])).logits[0, -1].float().topk(2).values
    return (top[0] - top[1]).item()


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where ``a`` and ``b`` differ (a length difference counts); ``None`` if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def compare_env(
    name: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sampler: VLLMSampler, n: int
) -> dict:
    """Both samplers' greedy episodes on ``n`` eval tasks of env ``name``, compared."""
    env = make_env(name, ENVS[name])
    tasks = env.tasks("eval", n, seed=0)
    played, seconds = {}, {}
    for label, policy in (("hf", model), ("vllm", sampler)):
        start = time.perf_counter()
        groups = generate(
            policy, tokenizer, env, tasks, group_size=1, max_new_tokens=env.max_new_tokens, temperature=0.0
        )
        seconds[label] = time.perf_counter() - start
        played[label] = [(g.prompt_ids.tolist(), g.rollouts[0]) for g in groups]
    divergences = []
    for (prompt, a), (_, b) in zip(played["hf"], played["vllm"], strict=True):
        x, y = a.token_ids.tolist(), b.token_ids.tolist()
        t = first_difference(x, y)
        if t is None:
            continue
        model_token = (t < len(x) and bool(a.loss_mask[t])) or (t < len(y) and bool(b.loss_mask[t]))
        gap = top2_gap(model, prompt + x[:t]) if model_token else float("inf")
        divergences.append({"task": a.task.id, "position": t, "model_token": model_token, "top2_gap": gap})
    return {
        "env": name,
        "tasks": n,
        "turns_mean": sum(len(r.turns) for _, r in played["hf"]) / n,
        "identical": n - len(divergences),
        "divergences": divergences,
        "max_divergence_gap": max((d["top2_gap"] for d in divergences), default=None),
        "ok": all(d["top2_gap"] < TIE_GAP for d in divergences),
        "seconds": seconds,
    }


def main() -> None:
    """Compare both envs and write the JSON."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--envs", nargs="+", default=list(ENVS), choices=list(ENVS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "greedy_parity.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model().eval(), load_tokenizer()
    sampler = VLLMSampler(model, tokenizer)
    try:
        rows = [compare_env(name, model, tokenizer, sampler, args.n) for name in args.envs]
    finally:
        sampler.close()
    for r in rows:
        print(
            f"{r['env']}: {r['identical']}/{r['tasks']} episodes token-identical "
            f"({r['turns_mean']:.1f} turns on average); largest top-2 gap at a divergence "
            f"{r['max_divergence_gap']}; ok={r['ok']}; seconds hf {r['seconds']['hf']:.0f}, "
            f"vllm {r['seconds']['vllm']:.0f}"
        )
    machine = f"{platform.machine()}, {os.cpu_count()} threads, torch {torch.__version__}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "tie_gap": TIE_GAP, "envs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
