"""How far bf16 autocast moves the RL gradient from fp32's, on a real batch of the quickstart task.

    python benchmarks/precision.py [--warm-start-steps 48] [--modes off,kv,packed] [key=value ...]

Warm-starts the recipe's model (so it answers in the task's format; or loads ``--init``), samples one RL
batch, then computes the completion log-probs and the gradient of the policy-gradient surrogate
``J = Σ_i A_i log π(y_i)`` with each training-forward mode in fp32 and under bf16 autocast: ``kv`` and
``packed`` on micro-batches as the trainer builds them (left-padded prompts), ``off`` one group at a time.
Prints, against fp32 ``off`` (the plain forward): the largest and mean error of the log-prob of each
completion's first token (the decision, on the quickstart), and the gradient's relative error
``|g - g_fp32| / |g_fp32|`` and cosine. Writes ``benchmarks/results/precision.json`` (or ``--out``).

Why it matters: ``J`` is a small difference of large per-sample terms (advantages sum to 0 in a group), and
the decision's margin is a fraction of a nat, so bf16's rounding need not cancel in that difference. The
figures measured on the quickstart are in ``docs/rl_findings.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from rltk import advantage, forward, plugins, rollout, selection
from rltk.batch import collate
from rltk.config import load_config
from rltk.pipeline import run_warm_start
from rltk.trainer import Trainer

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
RESULTS = Path(__file__).resolve().parent / "results" / "precision.json"


def main() -> None:
    """Warm start, sample a batch, compare log-probs and gradients across modes and precisions."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument(
        "overrides",
        nargs="*",
        help="recipe overrides, e.g. env.options.ask_rule=false; model.mixed_precision=bf16 speeds up "
        "the warm start only (the comparison always sets its own precision)",
    )
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--warm-start-steps", type=int, default=48)
    parser.add_argument("--modes", default="off,kv,packed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--groups-per-batch",
        type=int,
        default=0,
        help="groups per forward for kv/packed (default: the recipe's optim.groups_per_micro_batch, as "
        "trained); off always runs one group at a time",
    )
    parser.add_argument("--init", help="a torch.save'd {name: tensor} of trainable weights to load instead")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = [
        f"run.output_dir={tempfile.mkdtemp(prefix='rltk-precision-')}",
        "model.mixed_precision=no",
        f"warmstart.steps={args.warm_start_steps}",
        f"warmstart.enabled={'true' if args.warm_start_steps else 'false'}",
        *args.overrides,
    ]
    cfg = load_config(args.recipe, overrides, resolve=plugins.resolve)
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    if args.init:
        saved = torch.load(args.init)
        with torch.no_grad():
            for name, p in trainer.policy.lm.named_parameters():
                if p.requires_grad:
                    p.copy_(saved[name])
    elif args.warm_start_steps:
        run_warm_start(trainer)
    warm_s = time.perf_counter() - t0
    torch.manual_seed(cfg.run.seed)
    groups = rollout.generate(
        trainer.policy.lm,
        trainer.tokenizer,
        trainer.env,
        trainer.tasks_for_step(0),
        group_size=cfg.rollout.group_size,
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
    )
    trainer.rubric.score(groups)
    kept = selection.select(groups, trainer.algo).groups
    pad = trainer.tokenizer.pad_token_id
    per_group = [collate([g], pad) for g in kept]  # the plain forward of 64 rows would take >20 GB
    k = args.groups_per_batch or cfg.optim.groups_per_micro_batch
    as_trained = [collate(kept[i : i + k], pad) for i in range(0, len(kept), k)]  # left-padded prompts
    for batches in (per_group, as_trained):
        advantage.assign(batches, trainer.algo)
    params = {n: p for n, p in trainer.policy.lm.named_parameters() if p.requires_grad}
    if hasattr(trainer.policy.lm, "_original_forward"):  # accelerate wrapped forward in the run's autocast
        trainer.policy.lm.forward = trainer.policy.lm._original_forward
    trainer.policy.lm.train()

    def measure(mode: str, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``([N] first-token log-probs, [D] gradient of J)`` with ``mode`` at the given precision."""
        for p in params.values():
            p.grad = None
        firsts = []
        for batch in per_group if mode == "off" else as_trained:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                logp = forward.completion_logprobs(trainer.policy.lm, batch, mode=mode)  # [n, Lc]
            adv = batch.advantages if batch.advantages.dim() == 1 else batch.advantages[:, 0]  # [n]
            ((logp * batch.loss_mask).sum(-1) * adv).sum().backward()
            firsts.append(logp.detach()[:, 0])
        grad = torch.cat([p.grad.flatten() for p in params.values()]).double()
        return torch.cat(firsts), grad

    ref_logp, ref_grad = measure("off", bf16=False)
    rows = []
    for mode in args.modes.split(","):
        for bf16 in (False, True):
            logp, grad = measure(mode, bf16)
            first = (logp - ref_logp).abs()  # [N]
            row = {
                "mode": mode,
                "precision": "bf16 autocast" if bf16 else "fp32",
                "first_token_logp_err_max": float(first.max()),
                "first_token_logp_err_mean": float(first.mean()),
                "grad_rel_err": float((grad - ref_grad).norm() / ref_grad.norm()),
                "grad_cosine": float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0)),
            }
            rows.append(row)
            print(
                f"{mode:7s} {row['precision']:14s} decision logp err"
                f" max {row['first_token_logp_err_max']:.2e} mean {row['first_token_logp_err_mean']:.2e}"
                f" | grad rel err {row['grad_rel_err']:.3f}"
                f" cosine {row['grad_cosine']:.3f}"
            )
    out = {
        "model": cfg.model.name,
        "env": cfg.env.name,
        "warm_start_steps": args.warm_start_steps,
        "warm_start_s": round(warm_s, 1),
        "completions": sum(int(b.completion_ids.shape[0]) for b in per_group),
        "groups_per_batch": k,
        "overrides": args.overrides,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
