"""Two real processes: ``accelerate launch --multi_gpu --num_processes 2`` on a CPU starts two gloo ranks."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import tiny_overrides, two_rank_cmd

from rltk import distributed, evaluate
from rltk.batch import Failure, Rollout
from rltk.config import load_config
from rltk.env import Task
from rltk.pipeline import run

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
VOWELS = "rewards=[{name: 'plugins_for_tests:vowel_share'}]"
ENV = dict(os.environ, PYTHONPATH=str(REPO / "tests"), RLTK_NO_PROGRESS="1", CUDA_VISIBLE_DEVICES="")


def _launch_cmd(port: int, overrides: list[str]) -> list[str]:
    return two_rank_cmd(port, RECIPE, [*overrides, VOWELS])


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def _ranks_after_first_step(launcher: subprocess.Popen, run_dir: Path) -> dict[int, psutil.Process]:
    """The launcher's rank processes by rank, once a training step has been logged."""
    deadline = time.time() + 240
    while not any("loss" in row for row in _metrics(run_dir)):
        assert launcher.poll() is None and time.time() < deadline, "the run ended or never logged a step"
        time.sleep(0.2)
    children = psutil.Process(launcher.pid).children()
    ranks = {int(p.environ()["RANK"]): p for p in children if "RANK" in p.environ()}
    assert set(ranks) == {0, 1}, children
    return ranks


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(procs: list[psutil.Process], timeout: float) -> float:
    """Seconds until every process in ``procs`` has exited (or ``timeout``, then fail)."""
    start = time.monotonic()
    while not all(_gone(p) for p in procs):
        assert time.monotonic() - start < timeout, [p.pid for p in procs if not _gone(p)]
        time.sleep(0.05)
    return time.monotonic() - start


def test_two_ranks_train_and_hold_equal_weights(tiny_model_dir: str, tmp_path: Path) -> None:
    cmd = _launch_cmd(29517, tiny_overrides(tiny_model_dir, tmp_path, steps=2))
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    ranks = dict(re.findall(r"rank (\d)/2 final weights sha256 ([0-9a-f]{16})", log))
    assert set(ranks) == {"0", "1"}, log[-3000:]
    assert ranks["0"] == ranks["1"], f"ranks diverged: {ranks}"
    assert "world size 2" in log


def test_a_stopped_rank_fails_the_other_naming_it(tiny_model_dir: str, tmp_path: Path) -> None:
    run_dir, out = tmp_path / "run", tmp_path / "launch.log"
    timeout = ["run.save_every=0", "run.dist_timeout_s=20"]
    overrides = [*tiny_overrides(tiny_model_dir, run_dir, steps=500), *timeout]
    with open(out, "w") as log:
        launcher = subprocess.Popen(_launch_cmd(29527, overrides), env=ENV, stdout=log, stderr=log)
    try:
        ranks = _ranks_after_first_step(launcher, run_dir)
        ranks[1].suspend()  # SIGSTOP
        waited = _wait_gone([ranks[0]], timeout=60)
        print(f"SIGSTOP of rank 1 -> rank 0 exited in {waited:.1f} s")
        assert waited < 20 + 15  # the timeout, plus the rest of rank 0's phase and its exit
    finally:
        for p in psutil.Process(launcher.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        launcher.wait(timeout=60)
    text = out.read_text()
    line = next((x for x in text.splitlines() if x.startswith("error: ")), "")
    named = r"error: a collective failed on rank 0 .*: rank 1 \(pid \d+ .*\) is stopped"
    assert re.search(named, line), text[-3000:]
    assert "last seen in" in line and "run.dist_timeout_s=20" in line, line
    assert "Traceback" not in text.partition(line)[0]  # the rank says one line; the launcher reports after


def test_killing_the_launcher_ends_both_ranks(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path, steps=500), "run.save_every=0"]
    launcher = subprocess.Popen(
        _launch_cmd(29537, overrides), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ranks = _ranks_after_first_step(launcher, tmp_path)
    try:
        start = time.monotonic()
        launcher.kill()
        launcher.wait()
        gone = time.monotonic() - start + _wait_gone(list(ranks.values()), timeout=10)
        print(f"SIGKILL of the launcher -> both ranks gone in {gone:.2f} s")
    finally:
        for p in ranks.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def test_two_ranks_score_the_held_out_eval_like_one(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = ["eval.every=1", "eval.n=9"]  # 9: shards of 5 and 4 tasks
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    cmd = _launch_cmd(29547, [*tiny_overrides(tiny_model_dir, sharded, steps=1), *overrides])
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run(load_config(RECIPE, [*tiny_overrides(tiny_model_dir, single, steps=1), *overrides, VOWELS]))
    figures = ("eval/accuracy", "eval/mean_reward", "eval/best_trivial_accuracy")
    evals = [[{k: r[k] for k in figures} for r in _metrics(d) if r["step"] == 0] for d in (sharded, single)]
    assert evals[0] == evals[1] and len(evals[0]) == 1, evals


@pytest.mark.parametrize("world", [1, 2, 3, 7, 12])
def test_unsharded_rollouts_summarize_like_the_whole_set(world: int) -> None:
    rollouts = []
    for i in range(10):
        messages = [{"role": "user", "content": "x" * i}]
        task = Task(f"t/{i}", "eval", messages, {"gold": i}, {"rule": f"R{i % 3}"})
        empty = torch.zeros(0, dtype=torch.long)
        outcome = {"correct": i % 4 == 0}
        rollouts.append(Rollout(task, ["a"], empty, empty, empty.float(), outcome, reward=0.1 * i + 1 / 3))
    rollouts[5].failures, rollouts[5].reward = [Failure("vowel_share", "raised", "KeyError('x')")], math.nan
    # what gather_object does to each rank's shard: pickle it there, unpickle it on rank 0
    shards = [
        pickle.loads(pickle.dumps([evaluate.for_summary(r) for r in rollouts[k::world]]))
        for k in range(world)
    ]
    merged = evaluate.summarize("x", distributed.unshard(shards))
    assert merged == evaluate.summarize("x", rollouts)
    assert merged.by_tag and math.isfinite(merged.mean_reward)  # tags and the failed rollout survive the trip


GLOO_TIMEOUT = RuntimeError(
    "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv "
    "operation to complete"
)


def _write_beat(
    run_dir: Path, rank: int, seq: int, pid: int, *, failed: bool = False, age: float = 5.0
) -> None:
    phase = "update" if seq >= 6 else "rollout"
    beat = distributed.Beat(rank, pid, socket.gethostname(), seq, 3, phase, time.time() - age, failed)
    path = distributed.beat_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(beat)))


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ({"seq": 4}, r"rank 1 \(pid \d+ on .*\) looks stalled: last seen in rollout of step 3, 5 s ago"),
        # level with rank 0 and running: named once it has not failed within GRACE_S
        ({"seq": 6}, r"rank 1 \(pid \d+ on .*\) looks stalled: last seen in update of step 3"),
        ({"seq": 6, "failed": True}, r"; every other rank failed too"),
        ({"seq": 6, "pid": "exited"}, r"rank 1 \(pid \d+ on .*\) has exited: last seen in update of step 3"),
        ({"seq": 6, "age": 3600.0}, r"rank 1 left no heartbeat in this launch"),
    ],
)
def test_a_failed_collective_names_the_rank_that_stalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, peer: dict, expected: str
) -> None:
    monkeypatch.setattr(distributed, "GRACE_S", 0.5)
    if peer.get("pid") == "exited":
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        peer["pid"] = gone.pid
    started = time.time() - 60
    _write_beat(tmp_path, 0, 6, os.getpid())
    _write_beat(tmp_path, 1, **{"pid": os.getpid(), **peer})
    assert distributed.is_collective_failure(GLOO_TIMEOUT)
    assert not distributed.is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    message = distributed.explain_failure(tmp_path, 0, 2, 20.0, started, GLOO_TIMEOUT)
    head = "a collective failed on rank 0 in update of step 3 (Timed out waiting 20000ms for recv operation"
    assert message.startswith(head), message
    assert re.search(expected, message), message
    assert distributed.read_beat(distributed.beat_path(tmp_path, 0)).failed  # so rank 1 does not name rank 0


def _whiten_on_rank(
    rank: int, init: str, advs: list[torch.Tensor], masks: list[torch.Tensor], out: str
) -> None:
    """One gloo rank: whiten its own micro-batch with the statistics all-reduced over both ranks."""
    import torch.distributed as dist

    from rltk.advantage import whiten

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)

    def all_reduce(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    (mine,) = whiten([advs[rank]], [masks[rank]], all_reduce)
    torch.save(mine, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_whiten_advantages_like_one(tmp_path: Path) -> None:
    """PPO's whitening over the whole step: two gloo ranks, one micro-batch each, equal one process."""
    from rltk.advantage import whiten

    gen = torch.Generator().manual_seed(0)
    advs = [torch.randn(3, 5, generator=gen), torch.randn(2, 7, generator=gen)]
    masks = [(torch.rand(3, 5, generator=gen) > 0.3).float(), (torch.rand(2, 7, generator=gen) > 0.3).float()]
    whole = whiten(advs, masks, lambda v: v)
    out = str(tmp_path / "whitened")
    torch.multiprocessing.spawn(
        _whiten_on_rank, args=(f"file://{tmp_path / 'rendezvous'}", advs, masks, out), nprocs=2, join=True
    )
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(f"{out}.{rank}"), whole[rank], rtol=0, atol=1e-6)
