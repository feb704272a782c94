"""Shared fixtures: a real tokenizer (SmolLM2's, from the embedded model) and tiny Llama models built from a
config, so unit tests run in seconds on a CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from rltk.models import DEFAULT_MODEL, load_tokenizer, make_tiny_model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer (with its chat template), from the rltk model cache."""
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture
def tiny_model(tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A fresh tiny model per test (seeded, so identical across tests)."""
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase) -> str:
    """A tiny model + SmolLM2's tokenizer saved as a local HF directory (usable as ``model.name``)."""
    path = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def tiny_overrides(model_dir: str, run_dir: str | object, steps: int = 2) -> list[str]:
    """Recipe overrides for a seconds-long run of the quickstart recipe on the tiny model."""
    return [
        f"model.name={model_dir}",
        f"run.output_dir={run_dir}",
        f"run.steps={steps}",
        "run.save_every=1",
        "run.keep_last_n=10",
        "run.threads=1",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.max_new_tokens=5",
        "optim.groups_per_micro_batch=1",
        "optim.lr=1e-3",
        "warmstart.enabled=false",
        "eval.n=8",
        "eval.report.enabled=false",  # tests of the report enable it themselves
    ]


def sigkill_once_saved(cmd: list[str], env: dict[str, str], run_dir: Path, step: int) -> None:
    """Start the training command ``cmd`` and SIGKILL it as soon as checkpoint ``step`` of ``run_dir`` is
    complete (its manifest written); fails if the run ended or hung first."""
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    manifest = run_dir / "checkpoints" / f"step-{step:06d}" / "manifest.json"
    deadline = time.time() + 120
    while not manifest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert manifest.exists(), f"checkpoint {step} never completed"


def two_rank_cmd(port: int, recipe: str, overrides: list[str]) -> list[str]:
    """``accelerate launch`` of ``rltk.train`` on two CPU gloo ranks (``--multi_gpu --num_processes 2``)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port), "-m", "rltk.train", recipe, *overrides,
    ]  # fmt: skip
