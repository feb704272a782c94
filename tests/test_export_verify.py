"""The export's check on the env: played outside rltk, token by token against the unmerged checkpoint, with
the export's own chat template and end-of-turn ids; the adapter-only export and the model card."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_model, tiny_overrides
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from rltk.chat import render_prompt
from rltk.cli import main
from rltk.config import load_config
from rltk.durable import sha256_file
from rltk.export import ExportError, export, load_run, verify_dir
from rltk.export_sums import write_sums
from rltk.export_verify import ExportChild
from rltk.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
PLAIN = REPO / ".venv-plain" / "bin" / "python"
VOWELS = "rewards=[{name: 'plugins_for_tests:vowel_share'}]"


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step tiny LoRA run of the quickstart recipe."""
    root = tmp_path_factory.mktemp("verify")
    Trainer(load_config(RECIPE, [*tiny_overrides(tiny_model_dir, root / "run", steps=2)])).train()
    return root / "run"


@pytest.fixture(scope="module")
def merged(run_dir: Path) -> Path:
    return export(run_dir, run_dir.parent / "merged", n=8)


def _tampered(src: Path, dst: Path, change: Callable[[Path], None]) -> Path:
    """A copy of the export ``src`` changed by ``change``, its SHA256SUMS rewritten (so only the check on
    the env can tell)."""
    out = Path(shutil.copytree(src, dst))
    change(out)
    write_sums(out)
    return out


def test_export_is_played_on_the_envs_tasks_and_recorded(merged: Path) -> None:
    manifest = json.loads((merged / "rltk_export.json").read_text())
    v = manifest["verification"]
    assert manifest["kind"] == "merged" and v["ok"] and v["env"] == "policy_flagging" and v["tasks"] == 8
    assert v["turns"] == 8 and v["tokens"] >= 8 and v["mismatches"] == [] and v["loading_problems"] == []
    assert v["export_dir"] == str(merged)  # not the hidden directory it was checked in
    assert not list(merged.parent.glob(".merged.partial*"))


def test_the_child_cannot_import_rltk_or_peft(merged: Path) -> None:
    with ExportChild(merged, "merged") as child:
        assert child.ready["imported"] == []
        assert child.ready["missing_keys"] == child.ready["unexpected_keys"] == []
        assert child.ready["auto_map"] is None and not child.ready["quantized"]


def _scale_one_layer(out: Path) -> None:
    weights = load_file(out / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"] *= 100.0  # a merge that scaled one layer's weights wrong
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})


def test_a_weight_broken_after_the_merge_fails_under_teacher_forcing(
    merged: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _tampered(merged, tmp_path / "broken", _scale_one_layer)
    assert main(["export", "--check", str(out)]) == 0  # the bytes agree with SHA256SUMS
    capsys.readouterr()
    assert main(["export", "--verify", str(out), "--n", "8"]) == 1
    printed = capsys.readouterr().out
    assert printed.startswith("FAILED") and "checkpoint argmax" in printed, printed
    assert main(["export", "--verify", str(merged), "--n", "8"]) == 0
    assert capsys.readouterr().out.startswith("verified: merged export on 8 policy_flagging tasks")


def _one_prompt_check(export_dir: Path, reference: torch.nn.Module, tokenizer: object) -> bool:
    """rltk's first export check: 8 greedy tokens of one fixed prompt, export's against checkpoint's."""
    ids = torch.tensor(
        [render_prompt(tokenizer, [{"role": "user", "content": "Reply with one word: ready?"}])]
    )

    def greedy(model: torch.nn.Module) -> list[int]:
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )
        return out[0, ids.shape[1] :].tolist()

    return greedy(AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)) == greedy(reference)


def test_a_merge_broken_in_one_layer_passes_the_one_prompt_check_and_fails_on_env_tasks(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """One layer's LoRA delta left out of the merge (layer 0's v_proj keeps its base weight): 8 greedy
    tokens of one fixed prompt still agree, the env's tasks under teacher forcing do not. The base is tiny
    with an untied random head (a tied one echoes the last token whatever the weights) and the reward varies
    (vowel share), so two steps move the adapters."""
    base = tmp_path / "base"
    model = make_tiny_model(tokenizer, seed=0)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(64, model.config.vocab_size, bias=False)
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    overrides = [*tiny_overrides(str(base), tmp_path / "run", steps=2), VOWELS]
    Trainer(load_config(RECIPE, overrides)).train()
    out = export(tmp_path / "run", tmp_path / "out", n=16)

    key = "model.layers.0.self_attn.v_proj.weight"
    weights = load_file(out / "model.safetensors")
    original = load_file(base / "model.safetensors")[key]
    assert not torch.equal(weights[key], original)  # the merge did add a delta there
    weights[key] = original
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    write_sums(out)
    reference = load_run(tmp_path / "run").model
    assert _one_prompt_check(out, reference.float(), tokenizer)  # the old check would pass it
    report = verify_dir(out, n=16)
    assert not report.ok and len(report.mismatches) >= 3, report.summary()
    assert all(d.gap >= 1e-4 for d in report.mismatches)


def _template_adds_a_newline(out: Path) -> None:
    path = out / "chat_template.jinja"
    path.write_text(path.read_text().replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant\n\n'"))


def _lose_end_of_turn(out: Path) -> None:
    path = out / "generation_config.json"
    config = json.loads(path.read_text())
    config["eos_token_id"] = 0
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (_template_adds_a_newline, "chat template renders another prompt"),
        (_lose_end_of_turn, "generation_config.json ends turns at [0]"),
    ],
)
def test_what_a_server_would_read_differently_fails(
    merged: Path, tmp_path: Path, change: Callable[[Path], None], says: str
) -> None:
    report = verify_dir(_tampered(merged, tmp_path / "t", change), n=4)
    assert not report.ok and any(says in p for p in report.problems()), report.problems()


def test_export_that_fails_its_check_leaves_nothing_at_out(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not load with plain transformers"):
        export(run_dir, tmp_path / "out", n=2, python="/bin/false")  # a child that cannot load anything
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


def test_adapter_only_export_names_its_exact_base_and_verifies_with_peft(
    run_dir: Path, tiny_model_dir: str
) -> None:
    out = export(run_dir, run_dir.parent / "adapter", n=8, adapter_only=True)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "base_model.json", "README.md"} <= names
    assert "model.safetensors" not in names
    base_dir = Path(tiny_model_dir).resolve()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    base = json.loads((out / "base_model.json").read_text())
    assert base["sha256"] == sha256_file(base_dir / "model.safetensors")
    manifest = json.loads((out / "rltk_export.json").read_text())
    assert manifest["kind"] == "adapter" and manifest["verification"]["ok"]
    assert verify_dir(out, n=4).ok
    with ExportChild(out, "adapter") as child:  # only rltk refused: the refusal is what hides peft
        assert child.ready["imported"] == ["peft"]
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "peft"
    assert "another model" in card


def test_adapter_only_needs_a_lora_run(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path / "run", steps=1), "model.lora.enabled=false"]
    Trainer(load_config(RECIPE, overrides)).train()
    with pytest.raises(ExportError, match="without LoRA"):
        export(tmp_path / "run", tmp_path / "out", adapter_only=True)


def test_model_card_has_metadata_recipe_components_and_verification(merged: Path) -> None:
    card = (merged / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "transformers" and "policy_flagging" in meta["tags"]
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe["env"]["name"] == "policy_flagging" and recipe["run"]["steps"] == 2
    assert "| env | `policy_flagging` |" in card and "source sha256" in card
    assert "verified: merged export on 8 policy_flagging tasks" in card and "SHA256SUMS" in card


@pytest.mark.skipif(not PLAIN.is_file(), reason="no .venv-plain: bash scripts/setup_plain.sh")
def test_export_loads_and_verifies_in_a_venv_without_rltk_or_peft(merged: Path) -> None:
    report = verify_dir(merged, n=8, python=str(PLAIN))
    assert report.ok and report.loading_problems == [], report.problems()
    with ExportChild(merged, "merged", str(PLAIN)) as child:
        assert child.ready["imported"] == [] and child.ready["missing_keys"] == []
