"""FSDP2 on two CPU gloo ranks (``recipes/accelerate/fsdp.yaml``): the same weights as DDP, exact resumes.

Each case launches three 2-step runs of the quickstart recipe on the tiny model (DDP, FSDP, and FSDP resumed
from its step-1 checkpoint) through ``scripts/fsdp_cpu_check.py``, whose comparison (and its fp32
tolerance) this test reuses. ``python scripts/fsdp_cpu_check.py`` runs more cases and writes the figures
(``benchmarks/results/fsdp_cpu_check.txt``).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_overrides

REPO = Path(__file__).resolve().parent.parent


def _fsdp2_on_cpu() -> str:
    """Why this torch cannot run the test ("" if it can)."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
        from torch.distributed.tensor import distribute_tensor  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no FSDP2 (fully_shard, DTensor): {exc}"
    if not dist.is_available() or not dist.is_gloo_available():
        return f"torch {torch.__version__} was built without gloo: no CPU ranks"
    return ""


pytestmark = pytest.mark.skipif(bool(_fsdp2_on_cpu()), reason=_fsdp2_on_cpu() or "runs")


def _check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fsdp_cpu_check", REPO / "scripts" / "fsdp_cpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = {
    # full fine-tune, PPO's critic (2 epochs), the KL reference as a swapped-in snapshot, 2 groups per
    # micro-batch and 2 optimizer steps per RL step
    "full-ppo": [
        "model.lora.enabled=false",
        "algorithm.name=ppo",
        "algorithm.beta=0.05",
        "rollout.prompts_per_step=4",
        "optim.groups_per_micro_batch=2",
        "algorithm.minibatches=2",
    ],
    # LoRA adapters (peft save and load), the KL reference as the base with the adapters disabled
    "lora-kl": ["algorithm.beta=0.05"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_trains_like_ddp_and_resumes_exactly(case: str, tiny_model_dir: str, tmp_path: Path) -> None:
    check = _check()
    port = 29557 + 10 * list(CASES).index(case)
    runs = {}
    for i, config in enumerate(("ddp", "fsdp")):
        run_dir = tmp_path / config
        overrides = [*tiny_overrides(tiny_model_dir, run_dir), check.PACKED, *CASES[case]]
        _, log = check.launch(config, run_dir, port + i, overrides)
        assert ("FSDP2: 3 units, this rank holds" in log) == (config == "fsdp"), log[-3000:]
        runs[config] = run_dir / "checkpoints"
    ddp = runs["ddp"]
    moved = check.max_change(check.tensors(ddp / "step-000001"), check.tensors(ddp / "step-000002"))
    assert moved > 1e-4  # step 2 trained: the comparison below means something
    fsdp, ddp2 = check.tensors(runs["fsdp"] / "step-000002"), check.tensors(ddp / "step-000002")
    ok, detail = check.compare(fsdp, ddp2, moved)
    print(f"{case}: FSDP vs DDP\n{detail}")
    assert ok, detail

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000002")
    overrides = [*tiny_overrides(tiny_model_dir, resumed), check.PACKED, *CASES[case]]
    _, log = check.launch("fsdp", resumed, port + 2, overrides)
    assert "resumed from" in log, log[-3000:]
    again = check.tensors(resumed / "checkpoints" / "step-000002")
    assert fsdp.keys() == again.keys()
    assert all(torch.equal(fsdp[k], again[k]) for k in fsdp), "a resumed FSDP run redid step 2 differently"
