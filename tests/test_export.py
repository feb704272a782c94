"""Export: a run's LoRA checkpoint merges into a plain HF dir that loads and answers the same without rltk,
and whose ``SHA256SUMS`` catches any byte changed or file added after the export."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from rltk import checkpoint
from rltk.cli import main
from rltk.config import load_config
from rltk.export import ExportError, export
from rltk.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
VOWELS = "rewards=[{name: 'plugins_for_tests:vowel_share'}]"


@pytest.fixture(scope="module")
def exported(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-step tiny run and its export (verified on the env in an isolated process), shared: tests tamper
    with copies."""
    root = tmp_path_factory.mktemp("export")
    Trainer(load_config(RECIPE, [*tiny_overrides(tiny_model_dir, root / "run", steps=2), VOWELS])).train()
    return root / "run", export(root / "run", root / "out", n=8)  # played on 8 tasks outside rltk


def _flip_byte(path: Path) -> None:
    """Change one byte in the middle of ``path`` (in model.safetensors: one weight becomes garbage)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_export_merges_and_verifies_in_fresh_process(exported: tuple[Path, Path]) -> None:
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "SHA256SUMS"} <= names
    assert "hashes.json" not in names
    assert not any("adapter" in n for n in names), names
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or "chat_template.jinja" in names
    listed = [line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()]
    assert listed == sorted(names - {"SHA256SUMS"})  # every other file, sorted by name


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")
def test_untouched_export_passes_check_and_sha256sum(
    exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = exported
    proc = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "model.safetensors: OK" in proc.stdout
    assert main(["export", "--check", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "match SHA256SUMS" in printed and "model.safetensors" in printed and "README.md" in printed


@pytest.mark.parametrize(
    ("name", "tamper", "says"),
    [
        ("model.safetensors", _flip_byte, "changed (sha256"),
        ("tokenizer.json", _flip_byte, "changed (sha256"),
        ("README.md", _flip_byte, "changed (sha256"),
        ("pytorch_model.bin", lambda p: p.write_bytes(b"\0" * 64), "was added (not in SHA256SUMS)"),
        ("config.json", Path.unlink, "is missing"),
    ],
)
def test_check_names_each_changed_added_or_missing_file(
    exported: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    tamper: Callable[[Path], object],
    says: str,
) -> None:
    out = Path(shutil.copytree(exported[1], tmp_path / "copy"))
    tamper(out / name)
    assert main(["export", "--check", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert f"{name} {says}" in err and "Fix: re-export" in err, err


def test_export_arguments(exported: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run, out = exported
    assert main(["export", str(run)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["export", "--check", str(out), "--out", str(out)]) == 2
    assert "stands alone" in capsys.readouterr().err
    assert main(["export", "--check", str(run)]) == 2  # a run dir is not an export
    assert "has no SHA256SUMS" in capsys.readouterr().err


def test_eval_checks_an_exports_sums_before_loading(
    exported: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = Path(shutil.copytree(exported[1], tmp_path / "copy"))
    args = ["eval", "--model", str(out), "--n", "2", "--no-baselines", "--max-new-tokens", "4"]
    assert main(args) == 0  # untouched: checked, loaded, evaluated
    capsys.readouterr()
    _flip_byte(out / "model.safetensors")

    def must_not_load(*_: object, **__: object) -> None:
        raise AssertionError("rltk eval loaded a tampered export")

    monkeypatch.setattr("rltk.models.load_model", must_not_load)
    monkeypatch.setattr("rltk.models.load_tokenizer", must_not_load)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors changed" in err, err


def test_export_refuses_non_finite_weights_and_writes_nothing(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    run = Path(shutil.copytree(exported[0], tmp_path / "run"))
    # Write the NaN into the newest checkpoint's file and its manifest directly: checkpoint.save may refuse
    # non-finite weights, and a file damaged on disk (or saved by an older rltk) must be caught anyway.
    ckpt = checkpoint.latest(run)
    assert ckpt is not None and ckpt.name == "step-000002"
    adapter = ckpt / "model" / "adapter_model.safetensors"
    with safe_open(str(adapter), "pt") as f:
        metadata = f.metadata()
    weights = load_file(str(adapter))
    key = next(k for k in sorted(weights) if "layers.0.self_attn.q_proj.lora_A" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, str(adapter), metadata=metadata)
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    manifest["files"]["model/adapter_model.safetensors"] = {
        "sha256": hashlib.sha256(adapter.read_bytes()).hexdigest(),
        "size": adapter.stat().st_size,
    }
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.latest(run) == ckpt  # a valid checkpoint by its manifest, with a NaN weight

    with pytest.raises(ExportError) as info:
        export(run, tmp_path / "out")
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj.weight" in message and "NaN" in message, message
    assert "at step 2" in message and "--step 1 (valid earlier checkpoints: 1)" in message, message
    assert not (tmp_path / "out").exists()


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
    from transformers import AutoModelForCausalLM

    from rltk.export import load_run

    overrides = [*tiny_overrides(tiny_model_dir, tmp_path / "run", steps=2), VOWELS, "model.dtype=bfloat16"]
    Trainer(load_config(RECIPE, overrides)).train()
    out = export(tmp_path / "run", tmp_path / "out", n=8)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
    trained = load_run(tmp_path / "run").model  # bf16 base + fp32 adapters, as trained
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained.to(torch.float32)(input_ids=ids).logits
        got = exported(input_ids=ids).logits
    assert (want - got).abs().max() < 1e-4
