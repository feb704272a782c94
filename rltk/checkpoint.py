"""Stage "checkpoint": crash-safe save, discovery and restore of training state.

On-disk format (``FORMAT_VERSION`` 1)::

    <run_dir>/checkpoints/
        step-000012/
            model/            peft: adapter_model.safetensors, adapter_config.json (adapter only)
                              plain: model*.safetensors, config.json (``save_pretrained``), or
                              model.safetensors (``safetensors.torch.save_model``) for a bare nn.Module
            optimizer.pt      optimizer.state_dict()            (absent if no optimizer was given)
            scheduler.pt      scheduler.state_dict()            (absent if no scheduler was given)
            rng-rank{r}.pt    python random / numpy / torch CPU / CUDA RNG states of rank r
            extra.pt          values of ``extra`` that are not JSON-able (absent if none)
            state.json        {format_version, step, rltk_version, model_kind, world_size, saved_at, extra}
            manifest.json     {format_version, step, files: {relpath: {sha256, size}}}  -- written LAST
        .tmp-step-000014-<pid>/   a save in progress (or killed); never read, removed by a later save

A save writes everything into ``.tmp-step-NNNNNN-<pid>``, fsyncs every file and directory, renames it to
``step-NNNNNN`` and only then writes ``manifest.json`` (temp file + fsync + rename + fsync of both
directories). A checkpoint counts only if its manifest lists files that are all present with the recorded
size and sha256, so a save killed at any moment leaves the previous checkpoint as :func:`latest`.

Multi-rank: only the main process writes (model and optimizer are replicated under DDP, so rank 0's copy is
everyone's). Per-rank RNG states are gathered with :func:`rltk.rng.gather_rng_states` (a collective: call it
on every rank) and passed to :func:`save` on the main rank. Every rank then resumes with :func:`load` and
:func:`rltk.rng.restore_rng` with its own rank.

FSDP2 (:mod:`rltk.fsdp`): the files are the same, full tensors (a checkpoint resumes under DDP or FSDP, on
any number of ranks). Every rank holds the full weights, so the main process writes them alone; the
optimizer state is sharded and is all-gathered by :func:`save`, which every rank calls. :func:`load` runs
on every rank: each keeps its shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model

from rltk import fsdp
from rltk.durable import fsync_dir, sha256_file, write_json_atomic
from rltk.rng import rng_state

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d+)$")
_TEMP_RE = re.compile(r"^\.(?:tmp|trash)-step-\d+-(\d+)$")
logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded; the message names the problem and the fix."""


def step_dir(run_dir: str | Path, step: int) -> Path:
    """Return the directory of the checkpoint of ``step`` (``<run_dir>/checkpoints/step-000012``)."""
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of every ``step-N`` directory under ``root``, newest first (valid or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _rltk_version() -> str:
    try:
        return version("rltk")
    except PackageNotFoundError:
        return "unknown"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _is_peft(model: torch.nn.Module) -> bool:
    peft = sys.modules.get("peft")  # a PeftModel cannot exist unless peft was imported
    return peft is not None and isinstance(model, peft.PeftModel)


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers of ``model`` that hold a NaN or an inf."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _refuse_nonfinite(model: torch.nn.Module, step: int) -> None:
    if bad := nonfinite_tensors(model):
        more = f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""
        raise CheckpointError(
            f"refusing to save step {step}: non-finite values in {', '.join(bad[:3])}{more}; the earlier "
            "checkpoints are kept"
        )


def _save_model(model: torch.nn.Module, target: Path) -> str:
    """Save the trainable weights into ``target``; return the model kind ("peft" or "full").

    Under FSDP the state dict (the full weights) is read without FSDP's hooks (:func:`fsdp.plain_state_dict`).
    """
    full = {"state_dict": fsdp.plain_state_dict(model)} if fsdp.root_of(model) is not None else {}
    if _is_peft(model):
        model.save_pretrained(target, safe_serialization=True, **full)
        return "peft"
    if hasattr(model, "save_pretrained"):
        hf_logging = sys.modules.get("transformers.utils.logging")
        bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
        if bars:  # "Writing model shards" bars would spam logs on every save
            hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(target, safe_serialization=True, **full)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    else:
        target.mkdir()
        save_model(model, str(target / "model.safetensors"))
    return "full"


def _split_extra(extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``extra`` into JSON-able values (state.json) and the rest (extra.pt)."""
    as_json, other = {}, {}
    for key, value in extra.items():
        try:
            json.dumps(value, allow_nan=False)
            as_json[key] = value
        except (TypeError, ValueError):
            other[key] = value
    return as_json, other


def _clean_stale(root: Path) -> None:
    """Remove ``.tmp-``/``.trash-`` dirs of saves whose process is gone (killed mid-save)."""
    for path in root.iterdir():
        m = _TEMP_RE.match(path.name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # that process is alive: not ours to remove
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        logger.info("removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)


def _remove(path: Path) -> None:
    """Delete a checkpoint dir: rename it out of the ``step-N`` namespace first, so a kill leaves no half."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune(root: Path, current: int, keep_last_n: int) -> None:
    """Keep ``current`` plus the ``keep_last_n - 1`` newest valid older checkpoints; delete older ones."""
    kept = 1
    for step, path in step_dirs(root):
        if step >= current:
            continue
        if not (path / MANIFEST).exists():
            logger.info("removing %s: incomplete save (no %s)", path, MANIFEST)
            _remove(path)
        elif kept >= keep_last_n:
            logger.info("removing %s (keep_last_n=%d)", path, keep_last_n)
            _remove(path)
        elif problems := verify(path):
            logger.warning("keeping corrupt checkpoint %s for inspection: %s", path, "; ".join(problems))
        else:
            kept += 1


def _synced_files(tmp: Path) -> dict[str, dict[str, Any]]:
    """The manifest's entries (sha256, size) of every file under ``tmp``, each fsynced, then its dirs."""
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[path.relative_to(tmp).as_posix()] = {
            "sha256": sha256_file(path, fsync=True),
            "size": path.stat().st_size,
        }
    for d in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        fsync_dir(d)
    return files


def save(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: dict[str, Any] | None = None,
    keep_last_n: int | None = None,
    is_main_process: bool = True,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path | None:
    """Atomically write the checkpoint of ``step`` (see the module docstring for the format and order).

    Args:
        run_dir: The run's output directory; checkpoints go to ``<run_dir>/checkpoints``.
        step: The number of optimizer steps completed.
        model: The model (peft → adapter only; DDP / compile wrappers are stripped).
        optimizer: Its state is saved to ``optimizer.pt`` (skipped if None).
        scheduler: An LR scheduler with ``state_dict()`` (skipped if None).
        extra: Trainer state (data position, sampler state, ...). JSON-able values go to state.json, others
            (tensors) to extra.pt; :func:`load` returns them merged under ``"extra"``.
        keep_last_n: If set, delete older checkpoints beyond the newest ``keep_last_n`` valid ones.
        is_main_process: Non-main ranks return None without touching the disk (under FSDP after gathering
            the optimizer state with the main process).
        rng_states: Per-rank RNG states from :func:`rltk.rng.gather_rng_states`; default: this process's.

    Returns:
        The checkpoint directory on the main process, else None.

    Raises:
        CheckpointError: The model holds a NaN or an inf; nothing is written (older checkpoints stay).

    """
    optimizer_state = None
    if optimizer is not None and fsdp.has_sharded_state(optimizer):  # every rank, or gathered ahead
        optimizer_state = fsdp.full_optimizer_state(optimizer, keep=is_main_process)  # a collective
    if not is_main_process:
        return None
    _refuse_nonfinite(_unwrap(model), step)
    states = rng_states if rng_states is not None else [rng_state()]  # before anything can draw
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    final = step_dir(run_dir, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        kind = _save_model(_unwrap(model), tmp / "model")
        if optimizer is not None:
            state_dict = optimizer.state_dict() if optimizer_state is None else optimizer_state
            torch.save(state_dict, tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, state in enumerate(states):
            torch.save(state, tmp / f"rng-rank{rank}.pt")
        as_json, other = _split_extra(extra or {})
        if other:
            torch.save(other, tmp / "extra.pt")
        state_json = {"format_version": FORMAT_VERSION, "step": step, "rltk_version": _rltk_version()}
        state_json |= {
            "model_kind": kind,
            "world_size": len(states),
            "saved_at": time.time(),
            "extra": as_json,
        }
        (tmp / "state.json").write_text(json.dumps(state_json, indent=1, sort_keys=True))
        files = _synced_files(tmp)
        if final.exists():  # an invalid leftover, or a checkpoint being redone after resuming from earlier
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(final / MANIFEST, {"format_version": FORMAT_VERSION, "step": step, "files": files})
    fsync_dir(root)
    if keep_last_n is not None:
        _prune(root, step, keep_last_n)
    return final


def verify(path: str | Path) -> list[str]:
    """Problems that make the checkpoint at ``path`` unusable (empty list: valid)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    if not (path / MANIFEST).is_file():
        return [f"no {MANIFEST} (the save did not finish)"]
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
        fmt = manifest["format_version"]
        if not all(isinstance(meta, dict) for meta in files.values()):
            raise TypeError("a file entry is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST} is unreadable ({exc!r})"]
    if fmt != FORMAT_VERSION:
        return [f"format_version {fmt} is not supported (this rltk reads {FORMAT_VERSION})"]
    problems = [] if "state.json" in files else [f"{MANIFEST} lists no state.json"]
    m = _STEP_RE.match(path.name)
    if m and int(m.group(1)) != manifest.get("step"):
        problems.append(f"{MANIFEST} says step {manifest.get('step')}, the directory name says {m.group(1)}")
    for rel, meta in files.items():
        file = path / rel
        if ".." in Path(rel).parts or not file.is_file():
            problems.append(f"{rel} is missing")
        elif (size := file.stat().st_size) != meta.get("size"):
            problems.append(f"{rel} has {size} bytes, {MANIFEST} says {meta.get('size')}")
        elif (digest := sha256_file(file)) != meta.get("sha256"):
            problems.append(
                f"{rel} has sha256 {digest[:12]}…, {MANIFEST} says {str(meta.get('sha256'))[:12]}…"
            )
    return problems


def latest(run_dir: str | Path) -> Path | None:
    """Return the newest valid checkpoint in ``<run_dir>/checkpoints`` (warns about invalid newer ones)."""
    for _, path in step_dirs(Path(run_dir) / "checkpoints"):
        if problems := verify(path):
            logger.warning("skipping invalid checkpoint %s: %s", path, "; ".join(problems))
        else:
            return path
    return None


def _load_weights(model: torch.nn.Module, model_dir: Path, kind: str) -> None:
    if kind == "peft":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(model_dir / "adapter_model.safetensors")))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"adapter keys do not match: unexpected {result.unexpected_keys}, missing {missing}"
            )
        return
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    result = model.load_state_dict(weights, strict=False)
    # save_pretrained / save_model drop one name of each tied pair; accept a missing name only if it shares
    # storage with a loaded one.
    ptrs: dict[int, set[str]] = {}
    for name, tensor in model.state_dict().items():
        ptrs.setdefault(tensor.data_ptr(), set()).add(name)
    missing = [
        k for k in result.missing_keys if not (ptrs[model.state_dict()[k].data_ptr()] & weights.keys())
    ]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"weights do not match the model: unexpected {result.unexpected_keys}, missing {missing}"
        )


def _load_weights_sharded(model: torch.nn.Module, root: torch.nn.Module, model_dir: Path, kind: str) -> None:
    """:func:`_load_weights` under FSDP, on every rank: each copies its shard of the full tensors saved."""
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    rename = None
    if kind == "peft":
        from peft import get_peft_model_state_dict

        def rename(targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # saved names -> adapters
            return get_peft_model_state_dict(model, state_dict=targets)

    targets = fsdp.load_full(root, model, weights, rename)
    loaded = {id(t) for k, t in targets.items() if k in weights}
    unexpected = sorted(weights.keys() - targets.keys())
    # save_pretrained drops one name of each tied pair: accept a missing name whose parameter was loaded
    missing = sorted(k for k in targets.keys() - weights.keys() if id(targets[k]) not in loaded)
    if unexpected or missing:
        raise ValueError(f"weights do not match the model: unexpected {unexpected}, missing {missing}")


def _load_error(path: Path, detail: str) -> CheckpointError:
    others = [str(p) for _, p in step_dirs(path.parent) if p != path and not verify(p)]
    if not path.is_dir():
        return CheckpointError(f"there is no checkpoint at {path}; valid ones there: {others or 'none'}")
    alternatives = f"resume from an earlier valid one: {', '.join(others)}" if others else "start over"
    return CheckpointError(
        f"checkpoint {path} cannot be loaded: {detail}. Fix: delete {path} or {alternatives}."
    )


def load(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
) -> dict[str, Any]:
    """Verify the checkpoint at ``path`` and restore the model weights, optimizer and scheduler in place.

    Under FSDP (``model`` registered with :func:`rltk.fsdp.register_root`) every rank calls it: each keeps its
    shards of the weights and of the optimizer state, and the full weights are gathered again.

    RNG states are restored separately with :func:`rltk.rng.restore_rng`.

    Returns:
        The contents of state.json (``step``, ``extra`` with extra.pt merged in, ...).

    Raises:
        CheckpointError: The checkpoint is corrupt or incomplete, or does not fit ``model``.

    """
    path = Path(path)
    if problems := verify(path):
        raise _load_error(path, "; ".join(problems))
    state = json.loads((path / "state.json").read_text())
    model = _unwrap(model)
    kind = state["model_kind"]
    root = fsdp.root_of(model)
    try:
        if (kind == "peft") != _is_peft(model):
            raise ValueError(f"it holds a {kind} model, the model given is {type(model).__name__}")
        if root is not None:
            _load_weights_sharded(model, root, path / "model", kind)
        else:
            _load_weights(model, path / "model", kind)
        if optimizer is not None and (path / "optimizer.pt").is_file():
            saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
            if fsdp.has_sharded_state(optimizer):
                saved = fsdp.shard_optimizer_state(optimizer, saved)
            optimizer.load_state_dict(saved)
        if scheduler is not None and (path / "scheduler.pt").is_file():
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if (path / "extra.pt").is_file():
            state["extra"].update(torch.load(path / "extra.pt", weights_only=True))
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model/optimizer being resumed ({exc}). Was the recipe "
            f"(model, LoRA settings, optimizer) changed since it was saved? Restore it, or start a new run."
        ) from exc
    return state
