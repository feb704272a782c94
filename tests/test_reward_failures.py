"""Reward and env failures never reach the weights: a failed rollout leaves the gradient and its group's
baseline, too many failures stop the run, hung calls cost bounded time (issue 13, acceptance 1 and 2)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides

from rltk import loss, rollout, selection
from rltk.batch import Group
from rltk.config import load_config
from rltk.reward import reward_fn
from rltk.train import main as train_main
from rltk.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


RECIPE = str(REPO / "recipes" / "quickstart.yaml")


VOWELS = ["rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]"]


FAILURES = {
    "c_stuck": "stuck_in_c",
    "no_sigterm": "ignores_sigterm",
    "raise": "raises",
    "nan": math.nan,
    "inf": -math.inf,
    "type": "0.5",
    "range": 7.0,
    "huge": 1e308,
    "timeout": "sleeps",
}


@reward_fn(range=(0.0, 1.0))
def scripted(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> Any:
    """Scores ``ok|<value>`` with the value; any other ``<kind>|`` fails the way FAILURES says."""
    kind, _, value = completion.partition("|")
    if kind == "ok":
        return float(value)
    bad = FAILURES[kind]
    if bad == "raises":
        raise ValueError("scripted failure")
    if bad == "sleeps":
        time.sleep(1000)
    if bad == "stuck_in_c":
        sum(itertools.repeat(0))  # never returns to Python: no SIGALRM could stop it
    if bad == "ignores_sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            with contextlib.suppress(BaseException):
                time.sleep(1)
    return bad


@reward_fn(range=(-1.0, 0.0))
def harm(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """A (-1, 0) reward, like refund_harm, that crashes on ``crash|``."""
    kind, _, value = completion.partition("|")
    if kind == "crash":
        raise RuntimeError("harm crashed")
    return -float(value)


def _trainer(model_dir: str, run_dir: Path, *extra: str) -> Trainer:
    overrides = [*tiny_overrides(model_dir, run_dir, steps=1), *extra]
    return Trainer(load_config(RECIPE, overrides))


def _groups(trainer: Trainer) -> list[Group]:
    cfg = trainer.cfg
    return rollout.generate(
        trainer.policy.lm,
        trainer.tokenizer,
        trainer.env,
        trainer.tasks_for_step(0),
        group_size=cfg.rollout.group_size,
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
    )


def _script(groups: list[Group], failing: Mapping[tuple[int, int], str], scale: float = 1.0) -> None:
    """Rewrite the text the rewards read (not the tokens): distinct scores, or a failure, per rollout."""
    for i, g in enumerate(groups):
        for j, r in enumerate(g.rollouts):
            kind = failing.get((i, j))
            r.turns = [f"{kind}|0"] if kind else [f"ok|{scale * ((7 * i + 3 * j) % 10) / 10:.1f}"]


def _gradient(trainer: Trainer, groups: list[Group]) -> dict[str, torch.Tensor]:
    """The step's gradient on ``groups`` (reward, advantage, backward), without an optimizer step."""
    trainer.rubric.score(groups)
    batches, _ = trainer.make_experience(groups)
    algo = trainer.algo
    normalizer = loss.normalizer_for(batches, algo.aggregation, trainer.cfg.rollout.max_new_tokens)
    trainer.policy.train()
    trainer.updater.backward(batches, normalizer, step=0)
    grads = {
        n: p.grad.detach().clone() for n, p in trainer.policy.lm.named_parameters() if p.grad is not None
    }
    trainer.optimizer.zero_grad(set_to_none=True)
    return grads


def _without(groups: list[Group], failing: Mapping[tuple[int, int], str]) -> list[Group]:
    out = []
    for i, g in enumerate(copy.deepcopy(groups)):
        g.rollouts = [r for j, r in enumerate(g.rollouts) if (i, j) not in failing]
        out.append(g)
    return out


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "dr_grpo"])
def test_failed_rollouts_leave_the_gradient(tiny_model_dir: str, tmp_path: Path, aggregation: str) -> None:
    trainer = _trainer(
        tiny_model_dir,
        tmp_path,
        "rewards=[{name: 'test_reward_failures:scripted'}]",
        f"algorithm.aggregation={aggregation}",
        "algorithm.beta=0.1",
        "algorithm.entropy_coef=0.05",
        "rollout.group_size=5",
        "rollout.reward_timeout_s=1",
    )
    sampled = _groups(trainer)
    for kind in FAILURES:
        failing = {(0, 1): kind, (1, 4): kind, (1, 0): kind}
        groups = copy.deepcopy(sampled)
        _script(groups, failing)
        deleted = _without(groups, failing)
        got, want = _gradient(trainer, groups), _gradient(trainer, deleted)
        failed = [r for g in groups for r in g.rollouts if r.failed]
        assert len(failed) == 3 and all(
            r.failures[0].source == "test_reward_failures:scripted" for r in failed
        ), kind
        assert got.keys() == want.keys() and got
        worst = max(float((got[n] - want[n]).abs().max()) for n in got)
        assert worst <= 1e-6, (
            f"{kind}: gradient differs from the batch without the failed rollouts by {worst}"
        )
        assert any(float(g.abs().max()) > 1e-4 for g in got.values())  # a real gradient, not zero = zero
    trainer.rubric.close()


def test_a_crashing_negative_reward_cannot_raise_an_advantage(tiny_model_dir: str, tmp_path: Path) -> None:
    trainer = _trainer(
        tiny_model_dir, tmp_path, "rewards=[{name: 'test_reward_failures:harm'}]", "rollout.group_size=4"
    )
    groups = _groups(trainer)
    failing = {(0, 0): "crash", (1, 2): "crash", (1, 3): "crash"}
    _script(groups, failing)
    deleted = _without(groups, failing)
    for gs in (groups, deleted):
        trainer.rubric.score(gs)
    trainer.rubric.close()
    batches, metrics = trainer.make_experience(groups)
    reference, _ = trainer.make_experience(deleted)
    assert metrics["advantage/groups_kept"] == 2
    adv = torch.cat([b.advantages for b in batches])
    keep = torch.cat([b.keep for b in batches])
    torch.testing.assert_close(adv[keep], torch.cat([b.advantages for b in reference]), rtol=0, atol=1e-6)
    assert (adv[~keep] == 0).all()
    for b in batches:  # the failed rows are in no loss term
        assert all(bool(k) or float(m.sum()) == 0.0 for k, m in zip(b.keep, b.loss_mask, strict=True))


def test_a_group_left_with_one_rollout_is_dropped(tiny_model_dir: str, tmp_path: Path) -> None:
    scripted_reward = "rewards=[{name: 'test_reward_failures:scripted'}]"
    trainer = _trainer(tiny_model_dir, tmp_path, scripted_reward, "rollout.reward_workers=0")
    groups = _groups(trainer)
    _script(groups, {(0, 0): "raise", (0, 1): "nan", (0, 2): "type"})  # G = 4: one scored rollout left
    trainer.rubric.score(groups)
    result = selection.select(groups, trainer.algo)
    assert [g.task.id for g in result.groups] == [groups[1].task.id]
    assert result.metrics["advantage/groups_failed"] == 1.0


@pytest.mark.parametrize(("which", "share"), [("step", 0.6), ("window", 0.1)])
def test_failure_rates_stop_the_run_naming_the_reward(
    tiny_model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str, share: float
) -> None:
    rewards = f"{{name: 'plugins_for_tests:buggy', params: {{share: {share}}}}}"
    code = train_main(
        [
            RECIPE,
            *tiny_overrides(tiny_model_dir, tmp_path, steps=6),
            "rollout.prompts_per_step=4",
            f"rewards=[{{name: 'plugins_for_tests:vowel_share'}}, {rewards}]",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "reward 'plugins_for_tests:buggy' failed on" in err and "ZeroDivisionError" in err
    assert ("25% of one step" in err) == (which == "step"), err
    assert "Traceback" not in err


def test_a_stuck_env_step_fails_its_rollout_and_the_run_goes_on(
    tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rltk_envs.policy_flagging import PolicyFlaggingEnv

    calls = {"n": 0}
    real_check = PolicyFlaggingEnv.check

    def check(self: PolicyFlaggingEnv, task: Any, completion: str) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # one rollout of step 1: a tool or check looping on model output
            while True:
                with contextlib.suppress(Exception):  # the watchdog cannot be swallowed
                    time.sleep(0.01)
        return real_check(self, task, completion)

    monkeypatch.setattr(PolicyFlaggingEnv, "check", check)
    trainer = _trainer(tiny_model_dir, tmp_path, *VOWELS, "run.steps=2", "rollout.env_timeout_s=0.5")
    t0 = time.monotonic()
    trainer.train()
    assert time.monotonic() - t0 < 60
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["rollout/failed_frac"] == pytest.approx(1 / 8)
    assert rows[0]["rollout/stopped_env_failed"] == pytest.approx(1 / 8)
    assert rows[1]["rollout/failed_frac"] == 0.0


@pytest.mark.parametrize("k", [1, 3])
def test_hung_rewards_cost_at_most_ceil_k_over_w_deadlines(k: int) -> None:
    from rltk_envs.policy_flagging import PolicyFlaggingEnv

    from rltk.batch import Rollout
    from rltk.reward import Rubric, RubricItem

    env = PolicyFlaggingEnv()
    tasks = env.tasks("eval", 8)
    empty = torch.zeros(0, dtype=torch.long)
    groups = [
        Group(t, empty, [Rollout(t, [""], empty, empty, empty.float()) for _ in range(4)]) for t in tasks
    ]
    timeout_s, workers = 2.0, 2
    rubric = Rubric([RubricItem("scripted", scripted)], timeout_s=timeout_s, workers=workers)
    try:
        _script(groups, {})
        rubric.score(groups)  # starts the workers
        t0 = time.monotonic()
        rubric.score(groups)
        normal = time.monotonic() - t0
        hung = dict(zip([(i, 0) for i in range(k)], ["c_stuck", "no_sigterm", "timeout"], strict=False))
        _script(groups, hung)
        t0 = time.monotonic()
        rubric.score(groups)
        extra = time.monotonic() - t0 - normal
        assert extra <= math.ceil(k / workers) * timeout_s + 2.0, extra
        kinds = [(f.source, f.kind) for g in groups for r in g.rollouts for f in r.failures]
        assert kinds == [("scripted", "timeout")] * k
        assert sum(not r.failed for g in groups for r in g.rollouts) == 32 - k  # the rest re-ran, not failed
        name = rubric._pool.process_name
    finally:
        rubric.close()
    assert subprocess.run(["pgrep", "-x", name], capture_output=True).stdout == b""


def test_a_run_with_hung_rewards_finishes_and_leaves_no_worker(tiny_model_dir: str, tmp_path: Path) -> None:
    hangs = "{name: 'plugins_for_tests:buggy', params: {share: 0.1, how: hang}}"
    trainer = _trainer(
        tiny_model_dir,
        tmp_path,
        f"rewards=[{{name: 'plugins_for_tests:vowel_share'}}, {hangs}]",
        "run.steps=3",
        "rollout.prompts_per_step=4",
        "rollout.reward_timeout_s=1",
        "rollout.max_reward_error_rate=0.5",
    )
    before = _reward_workers()
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    timeouts = sum(r["reward/plugins_for_tests:buggy/timeouts"] for r in rows)
    assert timeouts > 0 and all(r["rollout/failed_frac"] < 0.25 for r in rows)
    assert trainer.rubric._pool is None  # closed with the run
    assert _reward_workers() <= before  # every worker this run started (or replaced) is gone


def _reward_workers() -> set[int]:
    """PIDs of this process's children named like reward workers (``rltk-rw-<tag>``)."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if fields.get("Name", "").startswith("rltk-rw-") and int(fields["PPid"]) == os.getpid():
                found.add(int(status.parent.name))
    return found


def test_a_stuck_check_fails_its_answer_in_an_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    from rltk_envs.policy_flagging import PolicyFlaggingEnv

    from rltk import evaluate
    from rltk.reward import Rubric

    env = PolicyFlaggingEnv()
    tasks = env.tasks("eval", 4)
    answers = [env.oracle(t.messages) for t in tasks]
    real_check = PolicyFlaggingEnv.check

    def check(self: PolicyFlaggingEnv, task: Any, completion: str) -> Any:
        if task.id == tasks[1].id:
            time.sleep(1000)
        return real_check(self, task, completion)

    monkeypatch.setattr(PolicyFlaggingEnv, "check", check)
    rubric = Rubric.from_config([], env, workers=0)
    judged = evaluate.judge(env, rubric, tasks, answers, env_timeout_s=0.3)
    assert [r.failed for r in judged] == [False, True, False, False]
    result = evaluate.summarize("oracle", judged)
    assert result.accuracy == 0.75 and math.isfinite(result.mean_reward)
