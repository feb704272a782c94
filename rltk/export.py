"""Stage "export": a run's checkpoint → a plain Hugging Face directory that needs no rltk to serve.

LoRA adapters are merged into the base weights; the directory holds ``model.safetensors``, ``config.json``,
the tokenizer with its chat template, a model card (``README.md``) with the run's evaluation if there is
one, and ``hashes.json`` (sha256 per file). :func:`verify` loads the export in a fresh Python process with
transformers alone and checks that its greedy answers equal the in-process model's.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rltk import checkpoint
from rltk.config import Config, load_config
from rltk.models import build_policy, load_tokenizer


class ExportError(RuntimeError):
    """An export could not be produced or did not verify."""


def load_run(
    run_dir: str | Path, step: int | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Config]:
    """Rebuild a run's policy from ``config.yaml`` and its newest valid checkpoint (or ``step``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not an rltk run dir (no config.yaml); pass the output_dir of a run")
    cfg = load_config(run_dir / "config.yaml", [])
    if step is None:
        path = checkpoint.latest(run_dir)
        if path is None:
            raise ExportError(f"{run_dir} has no valid checkpoint (none with a complete manifest)")
    else:
        path = run_dir / "checkpoints" / f"step-{step:06d}"
    tokenizer = load_tokenizer(cfg.model.name)
    model = build_policy(cfg, training=False)
    checkpoint.load(path, model=model)
    model.eval()
    return model, tokenizer, cfg


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(run_dir: str | Path, out: str | Path, step: int | None = None, check: bool = True) -> Path:
    """Merge and save a run's policy to ``out``; verify it outside rltk unless ``check`` is False."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new --out or remove it")
    model, tokenizer, cfg = load_run(run_dir, step)
    # Merge in fp32: a LoRA delta added to bf16 weights in bf16 is mostly rounded away. Upcasting a bf16
    # base is exact, so the export computes what was trained (base as trained + adapters), in fp32.
    model = model.to(torch.float32)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = Path(run_dir) / "eval.json"
    evaluation = report.read_text() if report.is_file() else "(no eval.json in the run dir)"
    (out / "README.md").write_text(
        textwrap.dedent(
            f"""\
            # {cfg.env.name} policy trained with rltk

            Base model: `{cfg.model.name}`; algorithm: `{cfg.algorithm.name}`; RL steps: {cfg.run.steps}.
            A plain transformers checkpoint (LoRA merged): load it with
            `AutoModelForCausalLM.from_pretrained(path)`; render prompts with the tokenizer's chat template.

            ## Evaluation (from the run dir)
            ```json
            {evaluation}
            ```
            """
        )
    )
    hashes = {p.name: _sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
    (out / "hashes.json").write_text(json.dumps(hashes, indent=2))
    if check:
        verify(out, model, tokenizer)
    return out


_VERIFY = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
assert getattr(model.config, "quantization_config", None) is None, "export is marked quantized"
assert "rltk" not in sys.modules and "peft" not in sys.modules
ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=8, do_sample=False)
print(json.dumps(out[0, ids["input_ids"].shape[1]:].tolist()))
"""


def verify(out: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Load ``out`` in a fresh process (transformers only) and compare greedy tokens with ``model``'s."""
    prompt = [{"role": "user", "content": "Reply with one word: ready?"}]
    ids = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        want = model.generate(**ids, max_new_tokens=8, do_sample=False)[
            0, ids["input_ids"].shape[1] :
        ].tolist()
    proc = subprocess.run(
        [sys.executable, "-c", _VERIFY, str(out), json.dumps(prompt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ExportError(
            f"the export at {out} does not load with plain transformers:\n{proc.stderr[-2000:]}"
        )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if got != want:
        raise ExportError(f"the export at {out} answers {got}, the merged model {want}: the merge is wrong")
