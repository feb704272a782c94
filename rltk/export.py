"""Stage "export": a run's checkpoint → a plain Hugging Face directory that needs no rltk to serve.

LoRA adapters are merged into the base weights; the directory holds ``model.safetensors``, ``config.json``,
``generation_config.json``, the tokenizer with its chat template, a model card (``README.md``) with the
run's evaluation if there is one, and ``SHA256SUMS`` (written last, in ``sha256sum -c`` format) over every
other file. :func:`check_export` (``rltk export --check``, and ``rltk eval`` before it loads an export)
re-hashes the directory against it. :func:`verify` loads the export in a fresh Python process with
transformers alone and checks that its greedy answers to a few of the env's eval prompts equal the
in-process model's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rltk import checkpoint, plugins
from rltk.chat import render_prompt
from rltk.config import Config, load_config
from rltk.durable import sha256_file
from rltk.models import build_policy, load_tokenizer

SUMS = "SHA256SUMS"
VERIFY_PROMPTS = 3  # eval tasks of the run's env that verify() answers in both processes
VERIFY_NEW_TOKENS = 32
_SUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")  # sha256sum's text (" ") and binary ("*") modes
_REEXPORT = "Fix: re-export it (rltk export RUN_DIR --out NEW_DIR) and do not edit or add files in an export"


class ExportError(RuntimeError):
    """An export could not be produced, did not verify, or no longer matches its ``SHA256SUMS``."""


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


def _files(root: Path) -> list[str]:
    """Every file under ``root`` but ``SHA256SUMS``, as sorted relative POSIX paths."""
    names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(n for n in names if n != SUMS)


def write_sums(out: Path) -> None:
    """Write ``out/SHA256SUMS`` over every other file of ``out`` (``sha256sum -c`` format, sorted by name)."""
    (out / SUMS).write_text("".join(f"{sha256_file(out / name)}  {name}\n" for name in _files(out)))


def _read_sums(path: Path) -> dict[str, str]:
    """``{name: sha256}`` from ``path/SHA256SUMS``; raises :class:`ExportError` if absent or malformed."""
    sums = path / SUMS
    if not path.is_dir():
        raise ExportError(f"{path} is not a directory; pass the --out directory of an rltk export")
    if not sums.is_file():
        raise ExportError(
            f"{path} has no {SUMS}, so it cannot be checked (not an rltk export, or one written before rltk "
            f"wrote {SUMS}). {_REEXPORT}."
        )
    want: dict[str, str] = {}
    for number, line in enumerate(sums.read_text().splitlines(), start=1):
        m = _SUM_LINE.match(line)
        if m is None:
            raise ExportError(
                f"{sums} line {number} is not '<64 hex digits>  <file name>': {line[:80]!r}. {_REEXPORT}."
            )
        want[m.group(2)] = m.group(1)
    return want


def check_export(path: str | Path) -> list[str]:
    """Re-hash every file of the export at ``path`` against its ``SHA256SUMS``.

    Returns:
        The names of the files checked, sorted.

    Raises:
        ExportError: Naming each changed, missing or added file (or an absent/malformed ``SHA256SUMS``).

    """
    path = Path(path)
    want = _read_sums(path)
    have = _files(path)
    problems = [f"{name} is missing" for name in sorted(want.keys() - set(have))]
    for name in have:
        if name not in want:
            problems.append(f"{name} was added (not in {SUMS})")
        elif (digest := sha256_file(path / name)) != want[name]:
            problems.append(f"{name} changed (sha256 {digest[:12]}…, {SUMS} says {want[name][:12]}…)")
    if problems:
        raise ExportError(
            f"the export at {path} does not match its {SUMS}: {'; '.join(problems)}. {_REEXPORT}."
        )
    return have


def _valid_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints of ``run_dir`` whose files match their manifest, oldest first."""
    found = checkpoint.step_dirs(run_dir / "checkpoints")
    return sorted(step for step, path in found if not checkpoint.verify(path))


def _non_finite_error(run_dir: Path, step: int | None, out: Path, names: list[str]) -> ExportError:
    valid = _valid_steps(run_dir)
    step = max(valid) if step is None else step  # None: load_run took the newest valid checkpoint
    earlier = [str(s) for s in valid if s < step]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    fix = (
        f"export an earlier step, e.g. --step {earlier[-1]} (valid earlier checkpoints: {', '.join(earlier)})"
        if earlier
        else "this run has no valid earlier checkpoint; retrain (e.g. with a lower optim.lr)"
    )
    return ExportError(
        f"the merged weights of {run_dir} at step {step} hold NaN or infinite values in {shown} (training "
        f"diverged before this checkpoint was saved); nothing was written to {out}. Fix: {fix}"
    )


def _card(cfg: Config, run_dir: Path) -> str:
    """The model card (``README.md``): what the model is, how to load it, the run's evaluation."""
    report = run_dir / "eval.json"
    evaluation = report.read_text() if report.is_file() else "(no eval.json in the run dir)"
    return textwrap.dedent(
        f"""\
        # {cfg.env.name} policy trained with rltk

        Base model: `{cfg.model.name}`; algorithm: `{cfg.algorithm.name}`; RL steps: {cfg.run.steps}.
        A plain transformers checkpoint (LoRA merged): load it with
        `AutoModelForCausalLM.from_pretrained(path)`; render prompts with the tokenizer's chat template.
        `sha256sum -c SHA256SUMS` in this directory checks every file.

        ## Evaluation (from the run dir)
        ```json
        {evaluation}
        ```
        """
    )


def export(run_dir: str | Path, out: str | Path, step: int | None = None, check: bool = True) -> Path:
    """Merge and save a run's policy to ``out``; verify it outside rltk unless ``check`` is False.

    Raises:
        ExportError: ``out`` is not empty, ``run_dir`` is not a run, the merged weights are not finite
            (before anything is written), or the export does not verify.

    """
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new --out or remove it")
    model, tokenizer, cfg = load_run(run_dir, step)
    prompts = verify_prompts(cfg) if check else []  # before writing: an env that fails leaves nothing
    # Merge in fp32: a LoRA delta added to bf16 weights in bf16 is mostly rounded away. Upcasting a bf16
    # base is exact, so the export computes what was trained (base as trained + adapters), in fp32.
    model = model.to(torch.float32)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if names := checkpoint.nonfinite_tensors(model):
        raise _non_finite_error(run_dir, step, out, names)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(_card(cfg, run_dir))
    write_sums(out)  # last: it covers every file above
    if check:
        verify(out, model, tokenizer, prompts)
    return out


def verify_prompts(cfg: Config, n: int = VERIFY_PROMPTS) -> list[dict[str, Any]]:
    """``n`` eval tasks of the run's env as ``{"id", "messages", "tools"}`` (what :func:`verify` answers)."""
    env = plugins.make_env(cfg.env.name, cfg.env.options)
    return [{"id": t.id, "messages": t.messages, "tools": t.tools} for t in env.tasks("eval", n, seed=0)]


# Runs in a fresh interpreter: what a server with transformers alone (no rltk, no peft) would load and answer.
_VERIFY = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, max_new_tokens = sys.argv[1], int(sys.argv[2])
prompts = json.load(sys.stdin)
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
assert getattr(model.config, "quantization_config", None) is None, "export is marked quantized"
assert "rltk" not in sys.modules and "peft" not in sys.modules
answers = []
for p in prompts:
    tools = {} if p["tools"] is None else {"tools": p["tools"]}
    ids = tok.apply_chat_template(
        p["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True, **tools
    )
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    answers.append(out[0, ids["input_ids"].shape[1]:].tolist())
print(json.dumps(answers))
"""


def _greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: dict[str, Any]) -> list[int]:
    """The in-process model's greedy tokens for one :func:`verify_prompts` entry."""
    ids = torch.tensor(
        [render_prompt(tokenizer, prompt["messages"], tools=prompt["tools"])], device=model.device
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=VERIFY_NEW_TOKENS,
            do_sample=False,
        )
    return out[0, ids.shape[1] :].tolist()


def verify(
    out: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[dict[str, Any]]
) -> None:
    """Load ``out`` in a fresh process (transformers only) and compare greedy tokens with ``model``'s.

    Args:
        out: The export directory.
        model: The merged model, in process.
        tokenizer: The run's tokenizer (the fresh process uses the exported one and its chat template).
        prompts: From :func:`verify_prompts`; each is answered with up to ``VERIFY_NEW_TOKENS`` tokens.

    Raises:
        ExportError: The export does not load with plain transformers, or answers differently.

    """
    want = [_greedy(model, tokenizer, p) for p in prompts]
    proc = subprocess.run(
        [sys.executable, "-c", _VERIFY, str(out), str(VERIFY_NEW_TOKENS)],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise ExportError(
            f"the export at {out} does not load with plain transformers:\n{proc.stderr[-2000:]}"
        )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for prompt, mine, theirs in zip(prompts, want, got, strict=True):
        if mine != theirs:
            raise ExportError(
                f"the export at {out} answers {prompt['id']} with tokens {theirs}, the merged model with "
                f"{mine}: the merge or the exported tokenizer/chat template is wrong"
            )
