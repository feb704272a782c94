"""Export: a run's LoRA checkpoint merges into a plain HF dir that loads and answers the same without rltk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_overrides

from rltk.config import load_config
from rltk.export import ExportError, export
from rltk.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
VOWELS = "rewards=[{name: 'plugins_for_tests:vowel_share'}]"


def test_export_merges_and_verifies_in_fresh_process(tiny_model_dir: str, tmp_path: Path) -> None:
    Trainer(load_config(RECIPE, [*tiny_overrides(tiny_model_dir, tmp_path / "run", steps=2), VOWELS])).train()
    out = export(tmp_path / "run", tmp_path / "out")  # verify() runs a fresh python with transformers only
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "hashes.json"} <= names
    assert not any("adapter" in n for n in names), names
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or "chat_template.jinja" in names
    hashes = json.loads((out / "hashes.json").read_text())
    assert "model.safetensors" in hashes


def test_export_refuses_non_empty_out_and_non_run_dir(tiny_model_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not an rltk run dir"):
        export(tmp_path, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export(tmp_path, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_bf16_base_run_exports_fp32_weights_that_compute_what_was_trained(
    tiny_model_dir: str, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from rltk.export import load_run

    overrides = [*tiny_overrides(tiny_model_dir, tmp_path / "run", steps=2), VOWELS, "model.dtype=bfloat16"]
    Trainer(load_config(RECIPE, overrides)).train()
    out = export(tmp_path / "run", tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
    trained, _, _ = load_run(tmp_path / "run")  # bf16 base + fp32 adapters, as trained
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.to(torch.float32)(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    assert (want - got).abs().max() < 1e-4
