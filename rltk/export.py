"""Stage "export": a run's checkpoint → a directory that serves with no rltk installed, verified on the env.

Two kinds: ``merged`` (default; LoRA merged into the base, fp32 ``model.safetensors``: what plain
transformers, vLLM or llama.cpp's converter load) and ``adapter`` (``--adapter-only``: peft's
``adapter_model.safetensors`` and ``adapter_config.json``, whose base is the exact directory the run
trained from, named with its sha256 in ``base_model.json``). Either holds the tokenizer with its chat
template, ``generation_config.json``, a model card (``README.md``, :mod:`rltk.model_card`),
``rltk_export.json`` (the run, step and verification) and ``SHA256SUMS`` (:mod:`rltk.export_sums`),
written last.

Nothing reaches ``--out`` unverified: the files are written to a hidden sibling directory, played on the
env's eval tasks in an isolated process (:mod:`rltk.export_verify`), and moved to ``--out`` only if they
verify. A GGUF file (``--gguf``) is converted from the merged weights and checked under llama.cpp
(:mod:`rltk.gguf`, :mod:`rltk.llamacpp_sampler`) before the move too.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rltk import checkpoint
from rltk.config import Config, load_config
from rltk.durable import sha256_file
from rltk.evaluate import run_eval_setup
from rltk.export_sums import SUMS, ExportError, check_export, write_sums
from rltk.export_verify import VerifyReport, verify_export
from rltk.model_card import BaseModel, Card, render
from rltk.models import build_policy, load_tokenizer

__all__ = ["SUMS", "ExportError", "LoadedRun", "check_export", "export", "load_run", "verify_dir"]

VERIFY_TASKS = 200  # eval tasks the export plays in the check (rltk export --n)
MANIFEST = "rltk_export.json"
BASE_FILE = "base_model.json"
KINDS = ("merged", "adapter")


class LoadedRun(NamedTuple):
    """A run's policy as :func:`load_run` rebuilt it, and the step of the checkpoint it holds."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cfg: Config
    step: int


def load_run(run_dir: str | Path, step: int | None = None) -> LoadedRun:
    """Rebuild a run's policy from ``config.yaml`` and its newest valid checkpoint (or ``step``)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not an rltk run dir (no config.yaml); pass the output_dir of a run")
    cfg = load_config(run_dir / "config.yaml", [])
    if step is None:
        path = checkpoint.latest(run_dir)
        if path is None:
            raise ExportError(f"{run_dir} has no valid checkpoint (none with a complete manifest)")
        step = int(path.name.rsplit("-", 1)[1])
    else:
        path = checkpoint.step_dir(run_dir, step)
    tokenizer = load_tokenizer(cfg.model.name)
    model = build_policy(cfg, training=False)
    checkpoint.load(path, model=model)
    model.eval()
    return LoadedRun(model, tokenizer, cfg, step)


def _valid_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints of ``run_dir`` whose files match their manifest, oldest first."""
    found = checkpoint.step_dirs(run_dir / "checkpoints")
    return sorted(step for step, path in found if not checkpoint.verify(path))


def _non_finite_error(run_dir: Path, step: int, out: Path, names: list[str]) -> ExportError:
    valid = _valid_steps(run_dir)
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


def _refuse_tied_lora(model: PreTrainedModel, cfg: Config) -> None:
    """A LoRA on ``lm_head`` of a model with tied embeddings would change the input embedding when merged."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and cfg.model.lora.enabled and "lm_head" in cfg.model.lora.target_modules:
        raise ExportError(
            "the run has a LoRA on lm_head while the model ties lm_head to the input embeddings: merged, it "
            "would change both. Fix: train without lm_head in model.lora.target_modules (or export with "
            "--adapter-only, which keeps the adapter separate)"
        )


def _write_weights(model: PreTrainedModel, kind: str, tmp: Path, base: BaseModel) -> None:
    """Save the merged weights, or the adapter with its base named (path, sha256)."""
    if kind == "adapter":
        for config in model.peft_config.values():
            config.base_model_name_or_path = base.path
        model.save_pretrained(tmp, safe_serialization=True)
        # The sha256 goes beside peft's config, not into it: peft warns "upgrade peft" on an unknown key.
        (tmp / BASE_FILE).write_text(json.dumps(base.__dict__, indent=2) + "\n")
        return
    model.save_pretrained(tmp, safe_serialization=True)


def export(
    run_dir: str | Path,
    out: str | Path,
    step: int | None = None,
    check: bool = True,
    *,
    n: int = VERIFY_TASKS,
    adapter_only: bool = False,
    python: str | None = None,
    gguf: tuple[str, ...] = (),
    converter: str | None = None,
) -> Path:
    """Export a run's checkpoint to ``out``, verified on ``n`` of its env's eval tasks (unless not ``check``).

    Args:
        run_dir: The run's output_dir.
        out: A new (or empty) directory.
        step: The checkpoint (default: the newest valid one).
        check: Play the export on the env in an isolated process before it reaches ``out``.
        n: Eval tasks played by the check.
        adapter_only: Write the LoRA adapter (peft) instead of merged weights.
        python: The interpreter of the check's child (default: this one, with rltk and peft refused).
        gguf: Also write ``model-TYPE.gguf`` for each type (``f16``, ``q8_0``, ``f32``), converted by
            llama.cpp's converter and played on ``n`` eval tasks under llama.cpp (:mod:`rltk.gguf`).
        converter: llama.cpp's ``convert_hf_to_gguf.py`` (default: the one ``scripts/setup_gguf.sh`` unpacks).

    Raises:
        ExportError: ``out`` is not empty, ``run_dir`` is not a run, the weights are not finite, an adapter
            is asked of a run without LoRA, or the export does not verify (nothing is left at ``out``).

    """
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty (or is a file); choose a new --out or remove it")
    kind = "adapter" if adapter_only else "merged"
    model, tokenizer, cfg, step = load_run(run_dir, step)
    if adapter_only and gguf:
        raise ExportError("--gguf converts merged weights: export once with --gguf, once with --adapter-only")
    if adapter_only and not cfg.model.lora.enabled:
        raise ExportError(
            f"{run_dir} trained without LoRA: there is no adapter; export it merged (no --adapter-only)"
        )
    _refuse_tied_lora(model, cfg)
    env, rubric, tasks, budget = run_eval_setup(cfg, n if check else 0)  # before writing: a bad env fails
    # Merge in fp32: a LoRA delta added to bf16 weights is mostly rounded away.
    model = model.to(torch.float32)
    weights = model
    if kind == "merged" and hasattr(model, "merge_and_unload"):
        weights = copy.deepcopy(model).merge_and_unload()  # the unmerged model stays: the check's reference
    if names := checkpoint.nonfinite_tensors(weights):
        raise _non_finite_error(run_dir, step, out, names)
    base = BaseModel.of(cfg.model.name)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_weights(weights, kind, tmp, base)
        tokenizer.save_pretrained(tmp)
        report = None
        if check:
            report = verify_export(tmp, model, tokenizer, env, rubric, tasks, budget, kind, python)
            _raise_unless_ok(report, out)
            report.export_dir = str(out)  # checked in the hidden directory, recorded where it lands
        ggufs = _write_ggufs(tmp, cfg, gguf, converter, n if check else 0)
        card = Card(cfg, run_dir, step, kind, base, env, rubric)
        _finish(tmp, card, report, ggufs)
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_ggufs(
    out: Path, cfg: Config, outtypes: tuple[str, ...], converter: str | None, n: int
) -> list[dict[str, Any]]:
    """Convert ``out``'s merged weights to ``model-TYPE.gguf`` per type; play ``n`` tasks under llama.cpp.

    Raises:
        ExportError: The converter or llama.cpp is missing (the message names the install), or a GGUF's
            mean reward differs from the safetensors export's by more than the tolerance.

    """
    from rltk.gguf import GgufError, write_gguf
    from rltk.llamacpp_sampler import reference_rollouts, verify_gguf

    written = []
    try:
        reference = reference_rollouts(out, cfg, n) if outtypes and n else None
        for outtype in outtypes:
            path = write_gguf(
                out, outtype, out / f"model-{outtype}.gguf", Path(converter) if converter else None
            )
            report = verify_gguf(path, out, cfg, n=n, reference=reference) if reference else None
            if report is not None and not report.passed:
                raise ExportError(
                    f"{path.name} under llama.cpp scores {report.mean_reward_gguf:.4f} on {report.n} eval "
                    f"tasks, the safetensors export {report.mean_reward_hf:.4f} ({report.diff_points:+.1f} "
                    f"points, tolerance {report.tolerance_points}; prompt tokenization differs on "
                    f"{len(report.prompt_mismatches)} tasks). Fix: try f16 or f32, which round less"
                )
            checked = {k: v for k, v in report.to_json().items() if k != "gguf_file"} if report else {}
            written.append({"file": path.name, "outtype": outtype, "bytes": path.stat().st_size, **checked})
    except GgufError as exc:
        raise ExportError(str(exc)) from exc
    return written


def _raise_unless_ok(report: VerifyReport, out: Path) -> None:
    if not report.ok:
        shown = "\n  ".join(report.problems())
        raise ExportError(
            f"{report.summary()}\n  {shown}\nNothing was written to {out}. A mismatch under teacher forcing "
            "means the merge (or the exported config) computes another function than the checkpoint; a chat "
            "template difference means a server would render other prompts than training did."
        )


def _finish(out: Path, card: Card, report: VerifyReport | None, ggufs: list[dict[str, Any]]) -> None:
    """The card, the manifest and (last) ``SHA256SUMS``."""
    cfg, run_dir, kind, base = card.cfg, card.run_dir, card.kind, card.base
    png = run_dir / "report" / "report.png"
    if png.is_file():
        shutil.copyfile(png, out / "report.png")
    verification = report.summary() if report else "Not verified (exported with --no-verify)."
    files = {BASE_FILE: "the base this adapter needs: path and sha256"} if kind == "adapter" else {}
    for g in ggufs:
        checked = (
            f"mean reward {g['mean_reward_gguf']:.4f} under llama.cpp vs {g['mean_reward_hf']:.4f} for the "
            f"safetensors on {g['n']} eval tasks, {g['identical']} identical greedy episodes"
            if "n" in g
            else "not checked under llama.cpp (--no-verify)"
        )
        files[g["file"]] = (
            f"GGUF {g['outtype']} for llama.cpp / Ollama ({g['bytes'] / 1e6:.1f} MB): {checked}"
        )
    (out / "README.md").write_text(render(card, verification, files))
    manifest = {
        "kind": kind,
        "run_dir": str(run_dir.resolve()),
        "step": card.step,
        "env": cfg.env.name,
        "base": base.__dict__,
        "verification": report.to_json() if report else None,
        "gguf": ggufs,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    write_sums(out)


def verify_dir(
    export_dir: str | Path, env_name: str | None = None, n: int = VERIFY_TASKS, python: str | None = None
) -> VerifyReport:
    """Re-verify an existing export against the checkpoint it came from (``rltk export --verify DIR``).

    Raises:
        ExportError: The export does not match its ``SHA256SUMS``, has no manifest, or its run is gone.

    """
    export_dir = Path(export_dir)
    check_export(export_dir)
    manifest_path = export_dir / MANIFEST
    if not manifest_path.is_file():
        raise ExportError(f"{export_dir} has no {MANIFEST} (exported by an older rltk): re-export it")
    manifest = json.loads(manifest_path.read_text())
    run_dir = Path(manifest["run_dir"])
    if not run_dir.is_dir():
        raise ExportError(
            f"{export_dir} was exported from {run_dir}, which is gone: the check needs its checkpoint"
        )
    base = manifest["base"]
    if manifest["kind"] == "adapter":
        digest = sha256_file(Path(base["path"]) / "model.safetensors")
        if digest != base["sha256"]:
            raise ExportError(
                f"the adapter's base {base['path']} changed (sha256 {digest[:12]}…, trained on "
                f"{base['sha256'][:12]}…): it is not the model the adapter was trained on"
            )
    model, tokenizer, cfg, _ = load_run(run_dir, manifest["step"])
    env, rubric, tasks, budget = run_eval_setup(cfg, n, env_name)
    model = model.to(torch.float32)
    return verify_export(export_dir, model, tokenizer, env, rubric, tasks, budget, manifest["kind"], python)
