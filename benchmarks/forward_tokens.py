"""Time the training forward+backward of rltk.forward's modes on the real model, and the rollout prefill.

    python benchmarks/forward_tokens.py --env policy_flagging --prompts 8 --group 8 --completion-len 6 \
        --lora-r 16 --modes kv-group,kv --repeats 2
    python benchmarks/forward_tokens.py --prompts 4 --group 8 --prompt-len 130 --shared-prefix 100

Prompts are an env's rendered train tasks (``--env``) or random ids (``--prompt-len``, of which the first
``--shared-prefix`` are common to all prompts); completions are random ids. Prints the tokens each level of
sharing processes (padded widths, as the module docstring of rltk.forward counts them):

* plain (``off``): ``P·G·(Lp+Lc)``
* per group (``packed``, and ``kv`` with prefix sharing disabled): ``P·(Lp+G·Lc)``
* shared prefix (``kv``): ``C + P·(Lp-C) + P·G·Lc``, C the prefix common to all P prompts

then, per mode, the median wall time of forward+backward and the largest log-prob difference from the first
mode timed (``kv-group``, ``kv-row`` and ``kv-rows`` force one of mode ``kv``'s choices, see ``KV_VARIANTS``;
``--completion-len 322 --modes kv-row,kv-rows`` shows why multi-turn completions run one row each); then
the time of the generation prefill (all but each prompt's last token, no grad) per group vs with the shared
prefix. Use ``--modes`` to time fewer modes (``off`` is slow on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

from rltk import forward, prefix
from rltk.batch import Batch
from rltk.chat import render_prompt
from rltk.models import add_lora, load_model, load_tokenizer
from rltk.plugins import get_env

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("off", "kv-group", "kv", "kv-row", "kv-rows", "packed")  # kv-*: see KV_VARIANTS


def random_prompts(p: int, lp: int, shared: int, vocab: int, gen: torch.Generator) -> list[list[int]]:
    """P random prompts of about ``lp`` tokens (a little ragged), the first ``shared`` common to all."""
    prefix = torch.randint(3, vocab, (shared,), generator=gen).tolist()
    return [
        prefix + torch.randint(3, vocab, (lp - shared - 5 * (i > 0),), generator=gen).tolist()
        for i in range(p)
    ]


def make_batch(prompts: list[list[int]], g: int, lc: int, vocab: int, gen: torch.Generator) -> Batch:
    """Left-padded ``prompts``, each with G random completions of ``lc`` tokens (every third half as long)."""
    p, lp = len(prompts), max(map(len, prompts))
    prompt_ids = torch.zeros((p, lp), dtype=torch.long)  # [P, Lp]
    prompt_mask = torch.zeros((p, lp), dtype=torch.long)  # [P, Lp]
    for i, x in enumerate(prompts):
        prompt_ids[i, lp - len(x) :] = torch.tensor(x)
        prompt_mask[i, lp - len(x) :] = 1
    completion_mask = torch.ones((p * g, lc), dtype=torch.long)  # [P*G, Lc]
    completion_mask[::3, max(1, lc // 2) :] = 0
    return Batch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(3, vocab, (p * g, lc), generator=gen),
        completion_mask=completion_mask,
        loss_mask=completion_mask.float(),
        advantages=torch.zeros(p * g),
        group_size=g,
    )


@contextlib.contextmanager
def patched(**constants: int) -> Iterator[None]:
    """Set module constants of rltk.forward for the duration (e.g. disable the kv mode's prefix level)."""
    saved = {name: getattr(forward, name) for name in constants}
    for name, value in constants.items():
        setattr(forward, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(forward, name, value)


# Variants of mode "kv": its constants forced one way (the plain "kv" runs as shipped).
KV_VARIANTS = {
    "kv-group": {"MIN_SHARED_PREFIX": sys.maxsize},  # the prefix level disabled (C = 0)
    "kv-row": {"SEPARATE_ROWS_FROM": sys.maxsize},  # the G completions of a prompt as one packed row
    "kv-rows": {"SEPARATE_ROWS_FROM": 1},  # one row per completion on a G-fold copy of the cache
}


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    """Wall times of ``repeats`` calls of ``fn`` and its last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default=None, help="render this env's train tasks as the prompts")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=130, help="random prompts only")
    parser.add_argument("--shared-prefix", type=int, default=0, help="random prompts only")
    parser.add_argument("--completion-len", type=int, default=8)
    parser.add_argument(
        "--lora-r", type=int, default=0, help="LoRA rank on all linear layers (0: full model)"
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model()
    if args.lora_r:
        model = add_lora(model, args.lora_r, 2 * args.lora_r, 0.0, TARGETS)
    p, g, lc, vocab = args.prompts, args.group, args.completion_len, model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    if args.env:
        tokenizer = load_tokenizer()
        prompts = [
            render_prompt(tokenizer, t.messages, tools=t.tools) for t in get_env(args.env)().tasks("train", p)
        ]
    else:
        prompts = random_prompts(p, args.prompt_len, args.shared_prefix, vocab, gen)
    batch = make_batch(prompts, g, lc, vocab, gen)
    lp = batch.prompt_ids.shape[1]
    c = prefix.shared_prefix_length(batch.prompt_ids, batch.prompt_mask)
    print(f"P={p} G={g} Lp={lp} (prompts {min(map(len, prompts))}..{lp}) Lc={lc} shared prefix C={c}")
    tokens = {
        "plain": p * g * (lp + lc),
        "per group": p * (lp + g * lc),
        "shared prefix": c + p * (lp - c) + p * g * lc,
    }
    print("tokens: " + ", ".join(f"{k} {v}" for k, v in tokens.items()))

    model.train()
    ref = None
    for mode in args.modes.split(","):
        kv_mode = "kv" if mode.startswith("kv") else mode
        constants = KV_VARIANTS.get(mode, {})

        def step(kv_mode: str = kv_mode, constants: dict = constants) -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            with patched(**constants):
                logp = forward.completion_logprobs(model, batch, mode=kv_mode)  # type: ignore[arg-type]
            logp.sum().backward()
            return logp.detach()

        times, logp = timed(step, args.repeats)
        ref = logp if ref is None else ref
        diff = (logp - ref).abs().max().item()
        print(
            f"{mode:>8}: fwd+bwd median {statistics.median(times):.3f}s (min {min(times):.3f}s), "
            f"max |dlogp| vs first {diff:.1e}"
        )

    model.eval()
    for name, prefix_len in (("prefill per group", 0), ("prefill shared prefix", c)):
        ids, mask = prefix.shared_prefix_layout(batch.prompt_ids, batch.prompt_mask, prefix_len)
        run = functools.partial(prefix.prefill, model, ids[:, :-1], mask[:, :-1], prefix_len)
        with torch.no_grad():
            times, _ = timed(run, args.repeats)
        print(f"{name:>22}: median {statistics.median(times):.3f}s (min {min(times):.3f}s)")


if __name__ == "__main__":
    main()
