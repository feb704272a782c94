"""Faults never reach the weights: non-finite steps are skipped, no checkpoint holds a NaN, damaged or busy
run dirs stop the run and change nothing (issue 13, acceptance 3 and 4)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from rltk import loss
from rltk.checkpoint import CheckpointError
from rltk.config import load_config
from rltk.rundir import RunDirBusyError, RunDirLock
from rltk.train import main as train_main
from rltk.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


RECIPE = str(REPO / "recipes" / "quickstart.yaml")


VOWELS = ["rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]"]


def _trainer(model_dir: str, run_dir: Path, *extra: str) -> Trainer:
    overrides = [*tiny_overrides(model_dir, run_dir, steps=1), *extra]
    return Trainer(load_config(RECIPE, overrides))


def _inject_nan_loss(monkeypatch: pytest.MonkeyPatch, steps: set[int]) -> None:
    """Make the loss of every micro-batch of these (0-based) steps NaN."""
    now = {"step": -1}
    real_loss, real_step = loss.policy_loss, Trainer.step

    def poisoned(*args: Any, **kwargs: Any) -> loss.LossOutput:
        out = real_loss(*args, **kwargs)
        if now["step"] in steps:
            out.loss = out.loss * math.nan
            out.metrics["loss/value"] = math.nan
        return out

    def step(self: Trainer, step: int) -> Any:
        now["step"] = step
        return real_step(self, step)

    monkeypatch.setattr(loss, "policy_loss", poisoned)
    monkeypatch.setattr(Trainer, "step", step)


def _trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.policy.lm.named_parameters() if p.requires_grad}


def test_a_nan_loss_skips_the_step_and_the_run_goes_on(
    tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(tiny_model_dir, tmp_path, *VOWELS, "run.steps=3")
    before = _trainable(trainer)
    _inject_nan_loss(monkeypatch, {0})
    result = trainer.step(0)
    assert result.metrics["update/nonfinite_skipped"] == 1.0 and "grad_norm" not in result.metrics
    after = _trainable(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before), "a NaN step moved the weights"
    assert all(p.grad is None for p in trainer.policy.lm.parameters())  # nothing carried into the next step
    moved = trainer.step(1)  # the run goes on, and learns again
    assert moved.metrics["update/nonfinite_skipped"] == 0.0 and math.isfinite(moved.metrics["grad_norm"])
    assert any(not torch.equal(after[n], t) for n, t in _trainable(trainer).items())


def test_a_nan_gradient_element_skips_the_step(tiny_model_dir: str, tmp_path: Path) -> None:
    trainer = _trainer(tiny_model_dir, tmp_path, *VOWELS)
    named = trainer.policy.lm.named_parameters()
    name, param = next((n, p) for n, p in named if p.requires_grad and "lora_B" in n)

    def poison(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[0] = math.nan
        return grad

    handle = param.register_hook(poison)
    before = _trainable(trainer)
    result = trainer.step(0)
    handle.remove()
    assert result.metrics["update/nonfinite_skipped"] == 1.0
    assert all(torch.equal(before[n], t) for n, t in _trainable(trainer).items()), name
    assert all(torch.isfinite(t).all() for t in _trainable(trainer).values())


def test_three_nan_steps_in_a_row_stop_the_run_and_no_checkpoint_holds_nan(
    tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _inject_nan_loss(monkeypatch, set(range(2, 8)))  # steps 1 and 2 fine, NaN from step 3 on
    code = train_main([RECIPE, *tiny_overrides(tiny_model_dir, tmp_path, steps=8), *VOWELS])
    err = capsys.readouterr().err
    assert code == 2 and "non-finite loss or gradient norm at steps 3, 4, 5 in a row" in err, err
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps == [f"step-{s:06d}" for s in range(1, 5)]  # skipped steps 3, 4 saved unchanged weights
    for path in (tmp_path / "checkpoints").rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values()), path


def _tree(path: Path) -> dict[str, str]:
    # .lock names its holder and .ranks/ holds each rank's heartbeat: bookkeeping of who runs, not run data
    files = [p for p in path.rglob("*") if p.is_file() and not p.relative_to(path).parts[0].startswith(".")]
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_every_checkpoint_damaged_stops_and_changes_nothing(
    tiny_model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [RECIPE, *tiny_overrides(tiny_model_dir, tmp_path, steps=2), *VOWELS]
    assert train_main(args) == 0
    for weights in (tmp_path / "checkpoints").rglob("*.safetensors"):
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError, match=r"every checkpoint of .* is damaged"):
        Trainer(load_config(RECIPE, args[1:]))  # and it lets go of the run dir: the CLI below gets it
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "step-000001" in err and "step-000002" in err and "adapter_model.safetensors" in err, err
    assert "run.output_dir" in err and "run.resume=never" in err and "Traceback" not in err
    assert _tree(tmp_path) == before


def test_a_kill_in_the_first_save_leaves_no_step_twice(tiny_model_dir: str, tmp_path: Path) -> None:
    args = [RECIPE, *tiny_overrides(tiny_model_dir, tmp_path, steps=2), "run.save_every=0", *VOWELS]
    assert train_main(args) == 0
    only = tmp_path / "checkpoints" / "step-000002"
    (only / "manifest.json").unlink()  # killed between the rename and the manifest: no checkpoint
    assert train_main(args) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_a_resumed_run_logs_no_step_twice(tiny_model_dir: str, tmp_path: Path) -> None:
    args = [RECIPE, *tiny_overrides(tiny_model_dir, tmp_path, steps=2), "eval.every=1", *VOWELS]
    assert train_main(args) == 0
    first = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # as if killed after step 2's metrics and eval but before its checkpoint
    latest = tmp_path / "checkpoints" / "step-000002"
    (latest / "manifest.json").unlink()
    assert train_main(args) == 0
    again = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], "eval/accuracy" in r) for r in again]
    assert keys == [(r["step"], "eval/accuracy" in r) for r in first] and len(set(keys)) == len(keys)


def test_a_second_writer_fails_at_once_naming_the_first(
    tiny_model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = RunDirLock(tmp_path)
    try:
        with pytest.raises(RunDirBusyError, match=r"in use by PID \d+ on host"):
            _trainer(tiny_model_dir, tmp_path, *VOWELS)
        t0 = time.monotonic()
        assert train_main([RECIPE, *tiny_overrides(tiny_model_dir, tmp_path), *VOWELS]) == 2
        assert time.monotonic() - t0 < 30
        assert "is in use by PID" in capsys.readouterr().err
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.release()
    assert train_main([RECIPE, *tiny_overrides(tiny_model_dir, tmp_path), *VOWELS]) == 0


def test_a_checkpoint_is_never_written_with_non_finite_weights(tmp_path: Path) -> None:
    from rltk import checkpoint

    model = torch.nn.Linear(4, 2)
    checkpoint.save(tmp_path, 1, model=model)
    with torch.no_grad():
        model.weight[0, 1] = math.inf
    with pytest.raises(CheckpointError, match=r"refusing to save step 2: non-finite values in weight"):
        checkpoint.save(tmp_path, 2, model=model)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]  # no half-written dir
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoints" / "step-000001"
