"""Slow tests on the real embedded SmolLM2-135M-Instruct (`slow`; those also marked `ci` run in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rltk import models
from rltk.config import load_config
from rltk.export import export
from rltk.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.ci]


def test_embedded_model_converts_into_rltk_cache_without_quantization(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RLTK_CACHE", str(tmp_path / "cache"))
    path = Path(models.resolve(models.DEFAULT_MODEL))
    assert path.is_relative_to(tmp_path / "cache")
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    model = models.load_model(models.DEFAULT_MODEL)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert model.config.num_hidden_layers == 30 and model.dtype == torch.float32
    tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True)
    assert len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids) > 5


def test_real_model_rl_steps_then_export(tmp_path: Path) -> None:
    overrides = [
        f"run.output_dir={tmp_path / 'run'}",
        "run.steps=2",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=6",
        "warmstart.enabled=true",
        "warmstart.steps=2",
        "warmstart.batch_size=4",
    ]
    trainer = Trainer(load_config(str(REPO / "recipes" / "quickstart.yaml"), overrides))
    from rltk.pipeline import run_warm_start

    run_warm_start(trainer)
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[-1]["mismatch/logp_abs_mean"] < 1e-3
    out = export(tmp_path / "run", tmp_path / "export")
    assert (out / "model.safetensors").stat().st_size > 100e6  # 135M parameters in fp32, merged


@pytest.mark.skipif(
    not (REPO / ".venv-vllm" / "bin" / "python").is_file() and not os.environ.get("RLTK_VLLM_PYTHON"),
    reason="no vLLM venv: create it with `bash scripts/setup_vllm.sh`",
)
def test_vllm_greedy_equals_hf_greedy_on_real_envs(tmp_path: Path) -> None:
    """20 eval tasks of invoice_extraction and of support_refund (5 turns): the vLLM sampler's greedy
    episodes equal the HF sampler's, or first differ where the top-2 logits tie within 1e-4 (the 200-task
    version is ``benchmarks/greedy_parity.py``)."""
    out = tmp_path / "parity.json"
    script = REPO / "benchmarks" / "greedy_parity.py"
    subprocess.run([sys.executable, str(script), "--n", "20", "--out", str(out)], check=True, cwd=REPO)
    rows = json.loads(out.read_text())["envs"]
    assert [r["env"] for r in rows] == ["invoice_extraction", "support_refund"]
    assert rows[1]["turns_mean"] > 1.5, "support_refund episodes should be multi-turn"
    for r in rows:
        assert r["ok"], f"{r['env']}: a greedy divergence away from a tie: {r['divergences']}"
        assert r["identical"] >= 15, f"{r['env']}: only {r['identical']}/20 episodes token-identical"
