"""Checkpoint stage: round trips (plain + LoRA), manifest-last atomicity, corruption handling, keep_last_n,
and a real kill -9 loop."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rltk import checkpoint, rng
from rltk.checkpoint import CheckpointError
from rltk.models import add_lora
from tests.conftest import make_tiny_model


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object) -> None:
    """One real optimizer step, so Adam has state (exp_avg, ...) and the scheduler has advanced."""
    model.train()
    ids = torch.randint(0, 100, (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _setup(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return optimizer, scheduler


def _assert_state_equal(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_state_equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_state_equal(x, y)
    else:
        assert a == b


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(4)


def _small() -> torch.nn.Module:
    """A bare nn.Module (saved with safetensors.save_model): fast, for the on-disk tests."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))


def _save_small(run_dir: Path, step: int, **kwargs: object) -> Path | None:
    model = _small()
    with torch.no_grad():
        model[0].weight.fill_(step)
    return checkpoint.save(run_dir, step, model=model, optimizer=None, **kwargs)


def test_roundtrip_plain_model(tokenizer, tiny_model, tmp_path):
    optimizer, scheduler = _setup(tiny_model)
    _train_step(tiny_model, optimizer, scheduler)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    gen_state = torch.Generator().manual_seed(5).get_state()
    extra = {"data_position": 17, "sampler": {"epoch": 1, "order": [3, 1, 2]}, "generator": gen_state}
    path = checkpoint.save(
        tmp_path, 3, model=tiny_model, optimizer=optimizer, scheduler=scheduler, extra=extra
    )
    expected = _draws()

    assert path == tmp_path / "checkpoints" / "step-000003"
    assert (path / "model" / "model.safetensors").is_file() and (path / "model" / "config.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    state_json = json.loads((path / "state.json").read_text())
    assert state_json["step"] == 3 and state_json["model_kind"] == "full" and state_json["rltk_version"]
    assert state_json["extra"] == {"data_position": 17, "sampler": {"epoch": 1, "order": [3, 1, 2]}}

    fresh = make_tiny_model(tokenizer, seed=1)
    assert not torch.equal(fresh.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)
    fresh_opt, fresh_sched = _setup(fresh)
    state = checkpoint.load(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # tying survives the load
    _assert_state_equal(optimizer.state_dict(), fresh_opt.state_dict())
    assert fresh_sched.state_dict() == scheduler.state_dict()
    assert state["step"] == 3 and state["extra"]["data_position"] == 17
    assert torch.equal(state["extra"]["generator"], gen_state)

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert rng.restore_rng(path, rank=0)
    got = _draws()
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_roundtrip_lora_adapter_only(tokenizer, tmp_path):
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    model = add_lora(make_tiny_model(tokenizer), **lora)
    optimizer, scheduler = _setup(model)
    _train_step(model, optimizer, scheduler)
    path = checkpoint.save(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler)
    assert sorted(p.name for p in (path / "model").glob("*.safetensors")) == ["adapter_model.safetensors"]

    torch.manual_seed(7)
    fresh = add_lora(make_tiny_model(tokenizer), **lora)
    lora_keys = [k for k in model.state_dict() if "lora_" in k]
    assert lora_keys and not all(torch.equal(model.state_dict()[k], fresh.state_dict()[k]) for k in lora_keys)
    fresh_opt, fresh_sched = _setup(fresh)
    checkpoint.load(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    _assert_state_equal(optimizer.state_dict(), fresh_opt.state_dict())

    with pytest.raises(CheckpointError, match="holds a peft model"):  # adapter into a plain model
        checkpoint.load(path, model=make_tiny_model(tokenizer))


def test_manifest_is_written_last_and_lists_every_file(tmp_path, monkeypatch):
    seen: dict[str, object] = {}
    real = checkpoint.write_json_atomic

    def spy(path: Path, data: dict) -> None:
        final = path.parent
        seen["files_before"] = sorted(
            p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()
        )
        seen["latest_before"] = checkpoint.latest(tmp_path)
        real(path, data)

    monkeypatch.setattr(checkpoint, "write_json_atomic", spy)
    path = _save_small(tmp_path, 5, extra={"x": torch.ones(2)})
    manifest = json.loads((path / "manifest.json").read_text())
    assert seen["latest_before"] is None  # renamed into place but not valid until the manifest exists
    assert sorted(manifest["files"]) == seen["files_before"]
    assert {"state.json", "rng-rank0.pt", "extra.pt", "model/model.safetensors"} <= set(manifest["files"])
    assert manifest["step"] == 5 and manifest["format_version"] == checkpoint.FORMAT_VERSION
    assert manifest["files"]["state.json"]["size"] == (path / "state.json").stat().st_size
    assert checkpoint.verify(path) == [] and checkpoint.latest(tmp_path) == path


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


DAMAGE = {
    "missing file": (lambda p: (p / "rng-rank0.pt").unlink(), "rng-rank0.pt is missing"),
    "bad sha": (
        lambda p: _flip_byte(p / "model" / "model.safetensors"),
        "model/model.safetensors has sha256",
    ),
    "truncated": (lambda p: (p / "state.json").write_text("{}"), "state.json has 2 bytes"),
    "no manifest": (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    "garbled manifest": (lambda p: (p / "manifest.json").write_text("{"), "manifest.json is unreadable"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_invalid_checkpoint_is_skipped_and_load_explains(tmp_path, caplog, damage):
    good = _save_small(tmp_path, 1)
    bad = _save_small(tmp_path, 2)
    break_it, problem = DAMAGE[damage]
    break_it(bad)
    assert any(problem in p for p in checkpoint.verify(bad)), checkpoint.verify(bad)
    with caplog.at_level(logging.WARNING, logger="rltk.checkpoint"):
        assert checkpoint.latest(tmp_path) == good
    assert "step-000002" in caplog.text and problem in caplog.text
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(bad, model=_small())
    assert problem in str(err.value) and f"delete {bad}" in str(err.value) and str(good) in str(err.value)
    with pytest.raises(CheckpointError, match=f"no checkpoint at .*step-000009; valid ones there: .*{good}"):
        checkpoint.load(good.with_name("step-000009"), model=_small())


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_simulated_kills_leave_previous_checkpoint(tmp_path, monkeypatch):
    previous = _save_small(tmp_path, 2)
    root = tmp_path / "checkpoints"
    stale = root / f".tmp-step-000003-{_dead_pid()}"  # killed while writing the temp dir
    (stale / "model").mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path) == previous

    def killed(path: Path, data: dict) -> None:
        raise KeyboardInterrupt  # killed after the rename, before the manifest

    monkeypatch.setattr(checkpoint, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        _save_small(tmp_path, 3)
    assert (root / "step-000003").is_dir() and not (root / "step-000003" / "manifest.json").exists()
    assert checkpoint.latest(tmp_path) == previous
    monkeypatch.undo()

    redone = _save_small(tmp_path, 3)  # the resumed run redoes step 3 over the leftover
    assert checkpoint.latest(tmp_path) == redone and checkpoint.verify(redone) == []
    assert not stale.exists()  # the dead process's temp dir was cleaned up


def test_keep_last_n_and_non_main_rank(tmp_path):
    for step in range(1, 4):
        _save_small(tmp_path, step)
    root = tmp_path / "checkpoints"
    assert _save_small(tmp_path, 4, keep_last_n=1, is_main_process=False) is None
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002", "step-000003"]
    (root / "step-000002" / "manifest.json").unlink()  # an incomplete save is removed too
    _save_small(tmp_path, 4, keep_last_n=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004"]
    _save_small(tmp_path, 5, keep_last_n=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-000005"]


def test_per_rank_rng(tmp_path):
    states = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        states.append(rng.rng_state())
    path = _save_small(tmp_path, 1, rng_states=states)
    assert json.loads((path / "state.json").read_text())["world_size"] == 2
    assert rng.restore_rng(path, rank=1)
    torch.manual_seed(11)
    expected = torch.rand(3)
    rng.restore_rng(path, rank=1)
    assert torch.equal(torch.rand(3), expected)
    assert rng.restore_rng(path, rank=2) is False


SUPERVISOR = textwrap.dedent(
    """
    import os, sys, traceback, torch
    from rltk import checkpoint

    def work(run_dir, rounds):
        model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
        opt = torch.optim.Adam(model.parameters())
        path = checkpoint.latest(run_dir)
        step = checkpoint.load(path, model=model, optimizer=opt)["step"] if path else 0
        assert path is None or torch.all(model[0].weight == step), "loaded weights are not the step's"
        print("loaded", step, flush=True)
        for step in range(step + 1, step + 1 + rounds):
            model(torch.ones(1, 512)).sum().backward()
            opt.step()
            with torch.no_grad():
                model[0].weight.fill_(step)
            checkpoint.save(run_dir, step, model=model, optimizer=opt, extra={"s": step}, keep_last_n=2)

    torch.set_num_threads(1)  # no OpenMP pool before fork (and the CPU is shared)
    work(sys.argv[2], 1)  # warm up torch's lazy first-use setup (seconds) once, before forking
    print("ready", flush=True)
    for line in sys.stdin:  # one line per round: how many saves; each round runs in a fresh forked process
        pid = os.fork()
        if pid == 0:
            try:
                work(sys.argv[1], int(line))
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        print(pid, flush=True)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
    """
)


def test_kill_9_during_saves_always_leaves_a_valid_checkpoint(tmp_path):
    """Torch is imported once; each round forks a saver that is SIGKILLed at a random moment."""
    rng = random.Random(os.getpid() ^ int(time.time()))
    cmd = [sys.executable, "-c", SUPERVISOR, str(tmp_path), str(tmp_path / "warmup")]
    pipe = subprocess.PIPE
    sup = subprocess.Popen(cmd, stdin=pipe, stdout=pipe, stderr=pipe, text=True)
    try:
        assert sup.stdout.readline() == "loaded 0\n" and sup.stdout.readline() == "ready\n", sup.stderr.read()
        steps = [0]
        for attempt in range(6):
            killing = attempt < 5
            sup.stdin.write("1000000\n" if killing else "3\n")
            sup.stdin.flush()
            pid = int(sup.stdout.readline())
            assert sup.stdout.readline() == f"loaded {steps[-1]}\n"  # resumed from what we saw last
            delay = rng.uniform(0.0, 0.3)
            if killing:
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
            assert int(sup.stdout.readline()) == (-9 if killing else 0), (attempt, delay)
            path = checkpoint.latest(tmp_path)
            if path is None:
                continue
            model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
            state = checkpoint.load(path, model=model, optimizer=torch.optim.Adam(model.parameters()))
            assert state["extra"]["s"] == state["step"] and torch.all(model[0].weight == state["step"])
            assert state["step"] >= steps[-1], f"went backwards after a kill at {delay:.3f}s"
            steps.append(state["step"])
    finally:
        sup.kill()
        sup.wait()
    assert steps[-1] > 0
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the clean last round removed the killed rounds' temp dirs
