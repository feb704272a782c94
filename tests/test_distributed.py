"""Two real processes: ``accelerate launch --multi_gpu --num_processes 2`` on a CPU starts two gloo ranks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parent.parent


def test_two_ranks_train_and_hold_equal_weights(tiny_model_dir: str, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", "29517",
        "-m", "rltk.train", str(REPO / "recipes" / "quickstart.yaml"),
        *tiny_overrides(tiny_model_dir, tmp_path, steps=2),
        "rewards=[{name: 'plugins_for_tests:vowel_share'}]",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"), RLTK_NO_PROGRESS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    ranks = dict(re.findall(r"rank (\d)/2 final weights sha256 ([0-9a-f]{16})", log))
    assert set(ranks) == {"0", "1"}, log[-3000:]
    assert ranks["0"] == ranks["1"], f"ranks diverged: {ranks}"
    assert "world size 2" in log
