"""Metrics stage: jsonl lines, truncate_after on resume, torn lines, wandb wiring, progress bar, kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from rltk import metrics
from rltk.metrics import MetricsError, MetricsLogger, Progress


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_appends_fsynced_json_lines(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(metrics.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with MetricsLogger(tmp_path, ["jsonl"], {}) as logger:
        logger.log(1, {"loss": torch.tensor(0.5), "acc": np.float32(0.25), "n": 3, "bad": float("nan")})
        logger.log(2, {"loss": 0.25, "hist": torch.tensor([1, 2]), "step": 99})
        assert len(synced) == 2  # every line is on disk before log() returns
    lines = _read(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2]  # a metric cannot override step
    assert lines[0]["loss"] == 0.5 and lines[0]["acc"] == 0.25 and lines[0]["n"] == 3
    assert lines[0]["bad"] is None and lines[1]["hist"] == [1, 2]
    assert abs(lines[0]["time"] - time.time()) < 60


def test_truncate_after_drops_later_steps_and_torn_line(tmp_path):
    logger = MetricsLogger(tmp_path, [], {})
    for step in range(1, 6):
        logger.log(step, {"reward": step / 10})
    logger.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 6, "rew')  # killed mid-line
    logger = MetricsLogger(tmp_path, [], {})  # reopening drops the torn tail before appending
    assert path.read_text().endswith('"reward": 0.5}\n')
    logger.truncate_after(3)
    assert [line["step"] for line in _read(path)] == [1, 2, 3]
    logger.log(4, {"reward": 0.0})  # the resumed run redoes step 4
    logger.close()
    assert [(line["step"], line["reward"]) for line in _read(path)] == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
        (4, 0.0),
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left


def test_truncate_after_drops_an_unterminated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(tmp_path, [], {})
    logger.log(1, {"x": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "x": 2}')  # parses, but was cut before its newline: not committed
    logger.truncate_after(10)
    logger.close()
    assert [line["step"] for line in _read(path)] == [1]


def test_non_main_rank_logs_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would raise if wandb were touched
    logger = MetricsLogger(tmp_path, ["jsonl", "wandb"], {}, is_main_process=False, rank=1)
    logger.log(1, {"x": 1})
    logger.truncate_after(0)
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_reporter(tmp_path):
    with pytest.raises(MetricsError, match="tensorboard"):
        MetricsLogger(tmp_path, ["tensorboard"], {})


class _FakeRun:
    def __init__(self, **kwargs: object) -> None:
        self.init_kwargs = kwargs
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def log(self, data: dict, step: int) -> None:
        self.logged.append((data, step))

    def finish(self) -> None:
        self.finished = True


@pytest.mark.parametrize("env_mode", [None, "online"])
def test_wandb_is_offline_unless_configured(tmp_path, monkeypatch, env_mode):
    runs: list[_FakeRun] = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    if env_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    logger = MetricsLogger(tmp_path, ["jsonl", "wandb"], {"run": {"seed": 0}})
    logger.log(7, {"reward": torch.tensor(1.0)})
    logger.close()
    (run,) = runs
    assert run.init_kwargs["mode"] == (env_mode or "offline")
    assert run.init_kwargs["dir"] == str(tmp_path) and run.init_kwargs["config"] == {"run": {"seed": 0}}
    assert run.logged == [({"reward": 1.0}, 7)] and run.finished
    assert _read(tmp_path / "metrics.jsonl")[0]["reward"] == 1.0  # jsonl is on as well


def test_wandb_missing_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(MetricsError, match="pip install wandb"):
        MetricsLogger(tmp_path, ["wandb"], {})


def test_progress_only_on_a_tty(monkeypatch):
    monkeypatch.delenv("RLTK_NO_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not Progress(10).enabled
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not Progress(10, enabled=False).enabled  # e.g. a non-main rank
    monkeypatch.setenv("RLTK_NO_PROGRESS", "1")
    assert not Progress(10).enabled
    monkeypatch.delenv("RLTK_NO_PROGRESS")
    with Progress(10, start=2) as progress:
        assert progress.enabled
        progress.update(3, reward=0.5, accuracy=0.25, step_time=1.5, tokens_per_s=1234.0)
        progress.update(4)
        progress.update(5, {"reward/mean": 0.75, "accuracy": 0.5, "time/step_s": 2.0, "tokens/per_s": 99.0})
        stats = progress._bar.tasks[0].fields["stats"]
        assert stats == "reward 0.750 · acc 50.0% · 2.00 s/step · 99 tok/s"
        progress.update(6, {"reward/mean": 0.1}, reward=0.2)  # keywords win over the metrics dict
        assert progress._bar.tasks[0].fields["stats"] == "reward 0.200"
        assert progress._bar.tasks[0].completed == 6
    assert progress._bar is None
    Progress(10, enabled=False).update(1, {"reward/mean": 1.0})  # disabled: accepts the same calls


CHILD = textwrap.dedent(
    """
    import json, sys
    from rltk.metrics import MetricsLogger
    run_dir = sys.argv[1]
    logger = MetricsLogger(run_dir, [], {})
    try:
        with open(logger.path) as f:
            last = max(json.loads(line)["step"] for line in f)
    except (FileNotFoundError, ValueError):
        last = 0
    logger.truncate_after(last)  # what a resumed run does
    print("ready", flush=True)
    step = last
    while True:
        step += 1
        logger.log(step, {"payload": "x" * 20000, "k": step})
    """
)


def test_kill_9_while_logging_loses_at_most_the_torn_line(tmp_path):
    rng = random.Random(os.getpid() ^ int(time.time()))
    path = tmp_path / "metrics.jsonl"
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -9
        lines = path.read_bytes().split(b"\n")
        complete = [json.loads(line) for line in lines[:-1]]  # all but a torn tail must parse
        assert [r["step"] for r in complete] == list(range(1, len(complete) + 1))
        assert all(r["k"] == r["step"] for r in complete)
    assert len(complete) > 0
