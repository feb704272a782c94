"""Write tests/data/reasoning_gym_completions.json: real completions to reasoning-gym tasks, for the test that
rltk's score equals reasoning-gym's own ``score_answer`` (tests/test_env_reasoning_gym.py).

200 model completions: the embedded default model (SmolLM2-135M-Instruct, greedy, ``--max-new-tokens``)
answers the first 50 eval tasks of each of four generators with different scorers (``leg_counting`` and
``basic_arithmetic``: the default exact/containment scorer; ``chain_sum``: a decimal comparison;
``spell_backward``: per-character partial credit), two under reasoning-gym's ``default`` system prompt and
two under ``direct``. A 135M model gets nearly all of them wrong, so the file adds 100 deterministic
perturbations built from the gold answer (the gold answer tagged, with text around it, cut short, behind a
wrong earlier tag, without tags, ...), so that the scores cover 0, partial credit and 1. Each record keeps
the task (generator, env options, id, dataset seed and index), the question and gold answer (to detect a
generator that changed), the completion, and the score reasoning-gym gave it when the file was written.

Run once (CPU heavy: a few minutes on 2 cores): ``nice -n 19 .venv/bin/python
scripts/reasoning_gym_completions.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import reasoning_gym
import torch
from reasoning_gym.utils import extract_answer
from rltk_envs.reasoning_gym import ReasoningGymEnv

from rltk.chat import render_prompt
from rltk.env import Task
from rltk.models import DEFAULT_MODEL, load_model, load_tokenizer

OUT = Path(__file__).parents[1] / "tests" / "data" / "reasoning_gym_completions.json"
GENERATORS: list[dict[str, Any]] = [
    {"task": "leg_counting", "system_prompt": "default"},
    {"task": "basic_arithmetic", "system_prompt": "direct"},
    {"task": "chain_sum", "system_prompt": "direct"},
    {"task": "spell_backward", "system_prompt": "default"},
]
PER_GENERATOR = 50
PERTURBED_PER_GENERATOR = 25


def perturb(answer: str, i: int) -> tuple[str, str]:
    """(kind, completion): the ``i``-th deterministic perturbation of the gold ``answer``."""
    cut = answer[: max(1, len(answer) // 2)]
    kinds = [
        ("gold", f"<answer>{answer}</answer>"),
        (
            "gold_after_reasoning",
            f"Let me think step by step.\nSo the result is clear.\n<answer> {answer} </answer>",
        ),
        ("gold_with_text", f"<answer>The answer is {answer}.</answer>"),
        ("cut_short", f"<answer>{cut}</answer>"),
        ("wrong_then_gold", f"<answer>{cut}</answer> no, wait: <answer>{answer}</answer>"),
        ("gold_then_wrong", f"<answer>{answer}</answer> no, wait: <answer>{cut}</answer>"),
        ("untagged", answer),
        ("uppercase", f"<answer>{answer.upper()}</answer>"),
        ("padded_number", f"<answer>+0{answer}.00</answer>"),
        ("unclosed", f"<answer>{answer}"),
    ]
    return kinds[i % len(kinds)]


def generate(model: Any, tokenizer: Any, tasks: list[Task], max_new_tokens: int) -> list[str]:
    """Greedy completions, a batch of 10 prompts at a time (left-padded)."""
    out: list[str] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(tasks), 10):
        prompts = [render_prompt(tokenizer, t.messages) for t in tasks[start : start + 10]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        print(f"  {start + len(prompts)}/{len(tasks)}", flush=True)
    return out


def rg_score(task: Task, completion: str) -> float:
    """reasoning-gym's own scoring, as its eval/eval.py does it (a raising scorer scores 0)."""
    ref = task.reference
    dataset = reasoning_gym.create_dataset(ref["task"], seed=ref["seed"], size=ref["size"], **ref["config"])
    try:
        return float(dataset.score_answer(answer=extract_answer(completion), entry=dataset[ref["index"]]))
    except Exception:
        return 0.0


def main() -> None:
    """Generate the completions and write the fixture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # beside other jobs on a small CPU, 2 threads at nice 19 wait on each other
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    tokenizer.padding_side = "left"
    model = load_model(DEFAULT_MODEL).eval()
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for options in GENERATORS:
        env = ReasoningGymEnv(**options)
        tasks = env.tasks("eval", PER_GENERATOR)
        print(f"{options['task']}: generating {len(tasks)} completions", flush=True)
        completions = [("model", c) for c in generate(model, tokenizer, tasks, args.max_new_tokens)]
        pairs = list(zip(tasks, completions, strict=True))
        for i, task in enumerate(tasks[:PERTURBED_PER_GENERATOR]):
            pairs.append((task, perturb(str(task.reference["entry"]["answer"]), i)))
        for task, (kind, completion) in pairs:
            entry = task.reference["entry"]
            records.append(
                {
                    "options": options,
                    "id": task.id,
                    "seed": task.reference["seed"],
                    "index": task.reference["index"],
                    "question": entry["question"],
                    "answer": entry["answer"],
                    "kind": kind,
                    "completion": completion,
                    "score": rg_score(task, completion),
                }
            )
    meta = {
        "generated_by": "scripts/reasoning_gym_completions.py",
        "model": DEFAULT_MODEL,
        "decoding": f"greedy, max_new_tokens={args.max_new_tokens}",
        "reasoning_gym": reasoning_gym_version(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=1, ensure_ascii=False) + "\n")
    scores = [r["score"] for r in records]
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB): {len(records)} records, "
        f"{sum(s == 1.0 for s in scores)} at 1, {sum(0 < s < 1 for s in scores)} partial, "
        f"{sum(s == 0 for s in scores)} at 0"
    )


def reasoning_gym_version() -> str:
    """The installed reasoning-gym's version (its ``__version__`` attribute lags its releases)."""
    from importlib.metadata import version

    return version("reasoning-gym")


if __name__ == "__main__":
    main()
