"""The engine end to end on a tiny model: steps, metrics, checkpoints, SIGKILL + resume, warm start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import tiny_overrides
from safetensors.torch import load_file

from rltk.config import load_config
from rltk.trainer import Trainer, run

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
VOWELS = ["rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["RLTK_NO_PROGRESS"] = "1"
    return env


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _adapter(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    files = list((run_dir / "checkpoints" / f"step-{step:06d}").rglob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def test_steps_log_metrics_and_checkpoint(tiny_model_dir: str, tmp_path: Path) -> None:
    cfg = load_config(RECIPE, [*tiny_overrides(tiny_model_dir, tmp_path), *VOWELS])
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.policy.named_parameters() if v.requires_grad}
    trainer.train()
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "loss", "grad_norm", "time/step_s", "tokens/per_s", "mismatch/logp_abs_mean"):
        assert key in rows[-1], key
    assert rows[-1]["mismatch/logp_abs_mean"] < 1e-3  # old log-probs from the training path match sampling
    after = dict(trainer.policy.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter moved"
    assert (tmp_path / "checkpoints" / "step-000002" / "manifest.json").is_file()
    assert (tmp_path / "config.yaml").is_file()


def _train_cmd(model_dir: str, run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "rltk.train", RECIPE, *tiny_overrides(model_dir, run_dir, steps), *VOWELS]


def test_sigkill_after_step_3_then_resume_equals_uninterrupted(tiny_model_dir: str, tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(tiny_model_dir, full, 6), env=_env(), check=True, capture_output=True)

    proc = subprocess.Popen(_train_cmd(tiny_model_dir, killed, 6), env=_env(), stderr=subprocess.DEVNULL)
    manifest = killed / "checkpoints" / "step-000003" / "manifest.json"
    deadline = time.time() + 120
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert manifest.exists()
    assert not (killed / "checkpoints" / "step-000006" / "manifest.json").exists(), (
        "run ended before the kill"
    )

    subprocess.run(_train_cmd(tiny_model_dir, killed, 6), env=_env(), check=True, capture_output=True)
    a, b = _adapter(full, 6), _adapter(killed, 6)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_full, rows_killed = _metrics(full), _metrics(killed)
    assert [r["step"] for r in rows_killed] == [1, 2, 3, 4, 5, 6]  # lines after the restored step dropped
    assert [r["reward/mean"] for r in rows_full] == [r["reward/mean"] for r in rows_killed]


def test_warm_start_learns_oracle_format(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [
        *tiny_overrides(tiny_model_dir, tmp_path, steps=1),
        "warmstart.enabled=true",
        "warmstart.steps=6",
    ]
    overrides += ["warmstart.lr=3e-3", "warmstart.batch_size=4"]
    trainer = run(load_config(RECIPE, overrides))
    rows = _metrics(tmp_path)
    warm = [r for r in rows if "warmstart/loss" in r]
    assert warm and warm[-1]["step"] == 0
    assert (tmp_path / "checkpoints" / "step-000000" / "manifest.json").is_file()
    assert trainer.start_step == 0
