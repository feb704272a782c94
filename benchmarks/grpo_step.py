"""GRPO step time: rltk's engine against TRL's ``GRPOTrainer`` on an identical config, in one run.

Same model (the embedded SmolLM2-135M-Instruct unless --model), same prompts (policy_flagging train tasks),
G, LoRA targets and rank, thread count; fp32, β=0, one update per batch, fixed-length generation
(min = max new tokens), gradient checkpointing off. TRL is also timed at its defaults (bf16, gradient
checkpointing) as a second row. Each side runs ``--warmup`` steps, then ``--steps`` timed steps.
Tokens/s counts P·G·(prompt + completion length) for both, whatever each engine really processes.

    python benchmarks/grpo_step.py [--steps 3] [--prompts 4] [--group 8] [--new-tokens 8] [--out FILE]

Prints the step times, the ratio rltk/TRL, and writes JSON (default benchmarks/results/grpo_step.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rltk.chat import render_prompt
from rltk.config import load_config
from rltk.env import Task
from rltk.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve
from rltk.plugins import get_env
from rltk.trainer import Trainer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def time_rltk(args: argparse.Namespace, out_dir: str) -> list[float]:
    """Seconds per step of rltk's engine (after warm-up)."""
    overrides = [
        f"run.output_dir={out_dir}",
        "run.resume=never",
        f"run.steps={args.warmup + args.steps}",
        f"run.threads={args.threads}",
        f"model.name={args.model}",
        "model.lora.enabled=true",
        f"model.lora.r={args.lora_r}",
        f"model.lora.target_modules=[{','.join(TARGETS)}]",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.new_tokens}",
        f"rollout.min_new_tokens={args.new_tokens}",
        "rollout.temperature=1.0",
        "algorithm.name=grpo",
        "algorithm.beta=0.0",
        "algorithm.epochs=1",
        f"algorithm.shared_prompt={args.shared_prompt}",
        f"optim.groups_per_micro_batch={args.prompts}",
        "warmstart.enabled=false",
    ]
    trainer = Trainer(load_config(None, overrides))
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        trainer.step(step)
        times.append(time.perf_counter() - t0)
    return times[args.warmup :]


def time_trl(args: argparse.Namespace, tasks: list[Task], defaults: bool, out_dir: str) -> list[float]:
    """Seconds per step of TRL's GRPOTrainer (after warm-up)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, *a: object, **k: object) -> None:
            self._t = time.perf_counter()

        def on_step_end(self, *a: object, **k: object) -> None:
            self.times.append(time.perf_counter() - self._t)

    timer = StepTimer()
    dataset = Dataset.from_list([{"prompt": t.messages} for t in tasks])
    extra = {} if defaults else {"bf16": False, "gradient_checkpointing": False}
    config = GRPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group,
        max_completion_length=args.new_tokens,
        generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0,
        beta=0.0,
        num_iterations=1,
        learning_rate=1e-5,
        max_steps=args.warmup + args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        **extra,
    )
    model = load_model(args.model, dtype="float32")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [float(len(str(c))) % 3 for c in completions],
        args=config,
        train_dataset=dataset,
        processing_class=load_tokenizer(args.model),
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=TARGETS),
        callbacks=[timer],
    )
    trainer.train()
    return timer.times[args.warmup :]


def main() -> None:
    """Run both engines and print/write the comparison."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shared-prompt", default="kv", choices=["kv", "packed", "off"])
    parser.add_argument("--skip-trl-defaults", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "grpo_step.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    resolve(args.model)  # convert the embedded model before timing anything

    env = get_env("policy_flagging")()
    tokenizer = load_tokenizer(args.model)
    tasks = env.tasks("train", 64 * args.prompts, seed=0)
    prompt_len = statistics.mean(len(render_prompt(tokenizer, t.messages, tools=t.tools)) for t in tasks)
    tokens = args.prompts * args.group * (prompt_len + args.new_tokens)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("rltk", time_rltk(args, f"{tmp}/rltk")))
        rows.append(("trl (fp32, no checkpointing)", time_trl(args, tasks, False, f"{tmp}/trl")))
        if not args.skip_trl_defaults:
            rows.append(("trl (defaults: bf16, checkpointing)", time_trl(args, tasks, True, f"{tmp}/trl2")))
    result = {
        "machine": {
            "platform": platform.platform(),
            "threads": args.threads,
            "cuda": torch.cuda.is_available(),
        },
        "config": {**vars(args), "prompt_len_mean": prompt_len},
        "rows": [
            {
                "engine": name,
                "step_s": statistics.median(t),
                "steps_s": t,
                "tokens_per_s": tokens / statistics.median(t),
            }
            for name, t in rows
        ],
    }
    rltk_s, trl_s = result["rows"][0]["step_s"], result["rows"][1]["step_s"]
    result["ratio_rltk_over_trl"] = rltk_s / trl_s
    print(
        f"P={args.prompts} G={args.group} prompt≈{prompt_len:.0f} tokens, completion={args.new_tokens} tokens"
    )
    for row in result["rows"]:
        print(f"{row['engine']:38s} {row['step_s']:8.2f} s/step  {row['tokens_per_s']:8.0f} tokens/s")
    print(f"ratio rltk / trl (same config): {result['ratio_rltk_over_trl']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
