"""Does FSDP shard rltk's training on CPU ranks? 2-step runs under DDP and FSDP, the weights compared.

    python scripts/fsdp_cpu_check.py [--modes full,lora,...] [--out benchmarks/results/fsdp_cpu_check.txt]

For each mode (:data:`MODES`: full fine-tune, LoRA, PPO's critic, the KL reference, shared-prefix
micro-batches with 2 optimizer steps per RL step, a warm start with held-out evals) it launches the same
2-step run of the quickstart recipe on a tiny Llama (2 layers, hidden 64, SmolLM2's vocabulary; seed 0) on
two gloo ranks, once with ``recipes/accelerate/ddp.yaml`` and once with ``recipes/accelerate/fsdp.yaml``,
and compares the step-2 checkpoints: the trained weights (full model or adapters, critic) and the optimizer
state (Adam's moments). Then it resumes the FSDP run from its step-1 checkpoint and compares the redone
step 2 with the uninterrupted one, and (``CROSS``) resumes DDP's step-1 checkpoint under FSDP. A checkpoint
holds full tensors under either engine (:mod:`rltk.checkpoint`), so the files compare directly.

fp32 tolerance: the two engines sum the same gradients in a different order (DDP all-reduces a rank's summed
micro-batches; FSDP reduce-scatters once per forward call of a layer), so gradients agree to rounding: Adam's
moments within ``RTOL`` of the tensor's largest value. Weights agree elementwise within ``ATOL + RTOL·|w|``,
except where Adam's ``m / (sqrt(v) + eps)`` turns a rounding difference of a gradient near ``eps`` (a rare
token's embedding row) into a visible one: such an element may differ by ``ADAM_SLACK`` (1%) of how far one
step moved the weights, and the report counts them. Exit status 0 when every comparison passes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

PACKED = "algorithm.shared_prompt=packed"  # FSDP refuses kv (rltk/policy.py); both engines run packed
MODES = {
    "full": ["model.lora.enabled=false"],
    "lora": [],
    "ppo": ["algorithm.name=ppo", "model.lora.enabled=false"],
    "kl": ["algorithm.beta=0.05", "model.lora.enabled=false"],  # the reference: a snapshot swapped in
    "kl-lora": ["algorithm.beta=0.05"],  # the reference: the base, adapters disabled
    # 2 groups per micro-batch, 2 minibatches: 2 optimizer steps per RL step; gradient checkpointing
    "mb-gc": [
        "model.lora.enabled=false",
        "rollout.prompts_per_step=4",
        "optim.groups_per_micro_batch=2",
        "algorithm.minibatches=2",
        "model.gradient_checkpointing=true",
    ],
    # a warm start (SFT on the shards) saved as step 0, and held-out evals of 5 and 4 tasks per rank
    "warm-eval": [
        "model.lora.enabled=false",
        "warmstart.enabled=true",
        "warmstart.steps=2",
        "warmstart.batch_size=2",
        "eval.every=1",
        "eval.n=9",
    ],
}
CROSS = {"full", "lora", "ppo"}  # one per kind of saved weights: full, adapters, critic
RTOL, ATOL = 1e-5, 1e-6  # fp32: |a - b| <= ATOL + RTOL * |b|
ADAM_SLACK = 0.01  # of one step's move: Adam's m / (sqrt(v) + eps) amplifies rounding (module docstring)


def tiny_model_dir(root: Path) -> str:
    """The tests' tiny Llama with SmolLM2's tokenizer, saved as a model dir (as ``tests/conftest.py``)."""
    from conftest import make_tiny_model

    from rltk.models import DEFAULT_MODEL, load_tokenizer

    path = root / "tiny-model"
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def overrides(model_dir: str, run_dir: Path, mode: str) -> list[str]:
    """The tests' seconds-long quickstart run (``tests/conftest.py: tiny_overrides``), in ``mode``."""
    from conftest import tiny_overrides

    return [*tiny_overrides(model_dir, run_dir, steps=2), PACKED, *MODES[mode]]


def launch(config: str, run_dir: Path, port: int, extra: list[str]) -> tuple[float, str]:
    """``accelerate launch --config_file recipes/accelerate/<config>.yaml`` on 2 CPU ranks; (seconds, log)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"), RLTK_NO_PROGRESS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "recipes" / "accelerate" / f"{config}.yaml"),
        "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(port),
        "-m", "rltk.train", str(REPO / "recipes" / "quickstart.yaml"), *extra,
        "rewards=[{name: 'plugins_for_tests:vowel_share'}]",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    seconds = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{config} run failed (exit {proc.returncode}):\n{log[-4000:]}")
    return seconds, log


def tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's trained tensors by name: model (or adapters), critic, Adam's moments."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted((step_dir / "model").glob("*.safetensors")):
        out.update({f"model/{k}": v for k, v in load_file(str(file)).items()})
    extra = step_dir / "extra.pt"
    if extra.is_file():
        critic = torch.load(extra, weights_only=True).get("critic", {})
        out.update({f"critic/{k}": v for k, v in critic.items()})
    optimizer = torch.load(step_dir / "optimizer.pt", weights_only=True)
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                out[f"optim/{index}/{key}"] = value
    return out


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], moved: float) -> tuple[bool, str]:
    """Whether ``a`` equals ``b`` within fp32 tolerance (module docstring), and one line per kind of tensor.

    Adam's moments (gradients): ``|a - b| <= RTOL * max|b|`` per tensor. Weights (model, critic): elementwise
    ``|a - b| <= ATOL + RTOL * |b|``, or, for the few elements Adam amplifies, within ``ADAM_SLACK`` of
    ``moved`` (how far one step moved the weights). The line counts the elements that needed the slack.
    """
    if a.keys() != b.keys():
        return False, f"different tensors: only in one {sorted(a.keys() ^ b.keys())[:6]}"
    ok, worst, slack = True, {}, {}
    for name in a:
        x, y = a[name].double(), b[name].double()
        if x.shape != y.shape:
            return False, f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if not x.numel():
            continue
        kind = name.split("/")[0]
        diff, scale = (x - y).abs(), float(y.abs().max())
        if kind == "optim":
            ok &= float(diff.max()) <= RTOL * scale
        else:
            strict = diff <= ATOL + RTOL * y.abs()
            ok &= bool((strict | (diff <= ADAM_SLACK * moved)).all())
            slack[kind] = slack.get(kind, 0) + int((~strict).sum())
        if float(diff.max()) >= worst.get(kind, (-1.0, "", 0.0))[0]:
            worst[kind] = (float(diff.max()), name, scale)
    rows = []
    for kind, (d, n, s) in worst.items():
        rows.append(f"  {kind:6s} max |diff| {d:.3e} (in {n}; max |x| there {s:.3e})")
        if kind in slack:
            rows[-1] += f"; {slack[kind]} elements beyond {ATOL:g} + {RTOL:g}·|x|"
    return ok, "\n".join(rows)


def max_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """The largest change of a trained weight (model or critic) between two checkpoints."""
    names = [n for n in after if not n.startswith("optim/")]
    return max(float((after[n].double() - before[n].double()).abs().max()) for n in names)


def main() -> int:
    """Run the check; print (and write) the report; exit 0 when every comparison is within tolerance."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", default="", help="also write the report here")
    parser.add_argument("--port", type=int, default=29650)
    args = parser.parse_args()
    import accelerate

    lines = [
        f"torch {torch.__version__}, accelerate {accelerate.__version__}, {os.cpu_count()} CPUs, "
        "2 gloo ranks, tiny Llama (2 layers, hidden 64)"
    ]
    print(lines[0], flush=True)
    all_ok, port = True, args.port
    with tempfile.TemporaryDirectory(prefix="fsdp-check-") as tmp:
        root = Path(tmp)
        model_dir = tiny_model_dir(root)
        for mode in args.modes.split(","):
            runs: dict[str, Path] = {}
            for config in ("ddp", "fsdp"):
                run_dir = root / f"{mode}-{config}"
                seconds, log = launch(config, run_dir, port, overrides(model_dir, run_dir, mode))
                port += 1
                sharded = re.search(r"rank0 INFO FSDP2: (.*)", log)
                what = f"FSDP2 {sharded.group(1)}" if sharded else "not sharded"
                line = f"{mode:9s} {config:4s}: 2 steps in {seconds:5.1f} s (launch included); {what}"
                if config == "fsdp" and not sharded:
                    line += "  <- FAIL: the FSDP config did not shard"
                    all_ok = False
                lines.append(line)
                print(line, flush=True)
                runs[config] = run_dir
            ddp = runs["ddp"] / "checkpoints"
            moved = max_change(tensors(ddp / "step-000001"), tensors(ddp / "step-000002"))
            ok, detail = compare(tensors(runs["fsdp"] / "checkpoints" / "step-000002"),
                                 tensors(ddp / "step-000002"), moved)  # fmt: skip
            lines += [f"{mode:9s} FSDP vs DDP after 2 steps: {'equal' if ok else 'DIFFERENT'} within fp32 "
                      f"tolerance; DDP's step 2 moved the weights by up to {moved:.3e}", detail]  # fmt: skip
            print("\n".join(lines[-2:]), flush=True)
            all_ok &= ok
            # resume: drop step 2, relaunch: the run resumes from step 1 and redoes step 2
            resumed = root / f"{mode}-fsdp-resumed"
            shutil.copytree(runs["fsdp"], resumed)
            shutil.rmtree(resumed / "checkpoints" / "step-000002")
            seconds, log = launch("fsdp", resumed, port, overrides(model_dir, resumed, mode))
            port += 1
            if "resumed from" not in log:
                lines.append(f"{mode:9s} FSDP resume: the run did not resume  <- FAIL")
                all_ok = False
            ok, detail = compare(tensors(resumed / "checkpoints" / "step-000002"),
                                 tensors(runs["fsdp"] / "checkpoints" / "step-000002"), moved)  # fmt: skip
            lines += [f"{mode:9s} FSDP resumed at step 1 vs uninterrupted, step 2 ({seconds:.1f} s): "
                      f"{'equal' if ok else 'DIFFERENT'} within fp32 tolerance", detail]  # fmt: skip
            print("\n".join(lines[-2:]), flush=True)
            all_ok &= ok
            if mode not in CROSS:
                continue
            # the same files under either engine: DDP's step-1 checkpoint resumed under FSDP
            crossed = root / f"{mode}-ddp-resumed-under-fsdp"
            shutil.copytree(runs["ddp"], crossed)
            shutil.rmtree(crossed / "checkpoints" / "step-000002")
            seconds, log = launch("fsdp", crossed, port, overrides(model_dir, crossed, mode))
            port += 1
            ok, detail = compare(tensors(crossed / "checkpoints" / "step-000002"),
                                 tensors(ddp / "step-000002"), moved)  # fmt: skip
            ok &= "resumed from" in log
            lines += [f"{mode:9s} DDP's step 1 resumed under FSDP vs DDP, step 2 ({seconds:.1f} s): "
                      f"{'equal' if ok else 'DIFFERENT'} within fp32 tolerance", detail]  # fmt: skip
            print("\n".join(lines[-2:]), flush=True)
            all_ok &= ok
    lines.append("PASS" if all_ok else "FAIL")
    print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
