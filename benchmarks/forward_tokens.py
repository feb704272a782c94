"""Time the training forward+backward of rltk.forward's modes (off, kv, packed) on the real model.

    python benchmarks/forward_tokens.py --prompts 4 --group 8 --prompt-len 130 --completion-len 8

Prints, per mode, the tokens the model processes and the median wall time of forward+backward, and the
largest log-prob difference from the plain forward.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rltk.batch import Batch
from rltk.forward import completion_logprobs
from rltk.models import load_model


def make_batch(p: int, g: int, lp: int, lc: int, vocab: int) -> Batch:
    gen = torch.Generator().manual_seed(0)
    prompt_mask = torch.ones((p, lp), dtype=torch.long)
    prompt_mask[1:, :5] = 0  # a little left padding
    completion_mask = torch.ones((p * g, lc), dtype=torch.long)
    completion_mask[::3, lc // 2 :] = 0  # some short completions
    return Batch(
        prompt_ids=torch.randint(3, vocab, (p, lp), generator=gen),
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(3, vocab, (p * g, lc), generator=gen),
        completion_mask=completion_mask,
        loss_mask=completion_mask.float(),
        advantages=torch.zeros(p * g),
        group_size=g,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=130)
    parser.add_argument("--completion-len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model()
    model.train()
    p, g, lp, lc = args.prompts, args.group, args.prompt_len, args.completion_len
    batch = make_batch(p, g, lp, lc, model.config.vocab_size)
    tokens = {"off": p * g * (lp + lc - 1), "kv": p * (lp + g * (lc - 1)), "packed": p * (lp + g * (lc - 1))}
    ref = None
    for mode in ("off", "kv", "packed"):
        times = []
        for _ in range(args.repeats):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            logp = completion_logprobs(model, batch, mode=mode)
            logp.sum().backward()
            times.append(time.perf_counter() - start)
        ref = logp.detach() if ref is None else ref
        diff = (logp.detach() - ref).abs().max().item()
        print(
            f"{mode:>6}: {tokens[mode]:>6} tokens, fwd+bwd median {statistics.median(times):.3f}s "
            f"(min {min(times):.3f}s), max |dlogp| vs off {diff:.1e}"
        )


if __name__ == "__main__":
    main()
