"""The reward stage: weights, None exclusion, failures (errors, timeouts, invalid values) counted and taken
out of the update, the failure guard's RewardError, param validation."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from rltk_envs.policy_flagging import PolicyFlaggingEnv

from rltk.batch import Group, Rollout
from rltk.config import RewardConfig
from rltk.env import Task
from rltk.failures import FailureGuard
from rltk.plugins import PluginError, get_reward
from rltk.reward import RewardError, Rubric, RubricItem, reward_fn

ENV = PolicyFlaggingEnv()


def make_groups(answers: list[list[str]], tasks: list[Task] | None = None) -> list[Group]:
    """One group per task, one rollout per answer, with the env's real verdict as outcome."""
    tasks = tasks or ENV.tasks("eval", len(answers))
    groups = []
    for task, row in zip(tasks, answers, strict=True):
        rollouts = []
        for a in row:
            empty = torch.zeros(0, dtype=torch.long)
            r = Rollout(task, [a], empty, empty, torch.zeros(0), outcome=ENV.check(task, a))
            rollouts.append(r)
        groups.append(Group(task, torch.zeros(0, dtype=torch.long), rollouts))
    return groups


def oracle_groups(n: int = 8, g: int = 2) -> list[Group]:
    tasks = ENV.tasks("eval", n)
    return make_groups([[ENV.oracle(t.messages)] * g for t in tasks], tasks)


def rollouts(groups: list[Group]) -> list[Rollout]:
    return [r for gr in groups for r in gr.rollouts]


def default_rubric(timeout_s: float = 10.0) -> Rubric:
    return Rubric.from_config([], ENV, timeout_s=timeout_s)


def test_weights_and_none_exclusion() -> None:
    rubric = default_rubric()
    assert [(i.name, i.weight) for i in rubric.items] == [
        ("flag_decision", 1.0),
        ("flag_rule", 0.5),
        ("answer_format", 0.2),
    ]
    groups = oracle_groups()
    metrics = rubric.score(groups)
    n_clear = sum(r.task.reference["label"] == "CLEAR" for r in rollouts(groups))
    assert 0 < n_clear < 16
    for r in rollouts(groups):
        if r.task.reference["label"] == "FLAG":
            assert r.scores == {"flag_decision": 1.0, "flag_rule": 1.0, "answer_format": 1.0}
            assert r.reward == pytest.approx(1.7)
        else:
            assert r.scores == {"flag_decision": 1.0, "flag_rule": None, "answer_format": 1.0}
            assert r.reward == pytest.approx(1.2)  # the None score is left out, not counted as 0
    assert metrics["reward/flag_rule/not_applicable"] == n_clear
    assert metrics["reward/flag_rule/mean"] == 1.0 and metrics["reward/flag_rule/std"] == 0.0
    assert metrics["reward/flag_decision/errors"] == metrics["reward/flag_decision/timeouts"] == 0
    expected = (1.7 * (16 - n_clear) + 1.2 * n_clear) / 16
    assert metrics["reward/total/mean"] == pytest.approx(expected)


def test_mixed_answers_metrics() -> None:
    tasks = [t for t in ENV.tasks("eval", 40) if t.reference["label"] == "FLAG"][:2]
    answers = [["CLEAR", "garbage", ENV.oracle(t.messages), "FLAG"] for t in tasks]
    rubric = Rubric.from_config(
        [{"name": "flag_decision", "weight": 2.0, "params": {"miss_cost": 3.0}}, {"name": "answer_format"}],
        ENV,
    )
    m = rubric.score(make_groups(answers, tasks))
    # flag_decision per row: -3 (miss), -3 (unparseable = minimum), 1, 1 (bare FLAG: decision right)
    assert m["reward/flag_decision/mean"] == pytest.approx(-1.0)
    assert m["reward/flag_decision/std"] == pytest.approx(2.0)
    assert m["reward/answer_format/mean"] == pytest.approx(0.5)
    r = rollouts(make_groups(answers, tasks))
    rubric.score([Group(tasks[0], torch.zeros(0), r[:4])])
    assert [x.reward for x in r[:4]] == pytest.approx([2 * -3 + 1, 2 * -3, 2 * 1 + 1, 2 * 1])


def test_config_objects_and_env_cost_defaults() -> None:
    env = PolicyFlaggingEnv(miss_cost=3.0)
    rubric = Rubric.from_config([RewardConfig(name="flag_decision", weight=1.0, params={})], env)
    assert rubric.items[0].params == {"miss_cost": 3.0, "false_alarm_cost": 1.0}
    rubric = Rubric.from_config([RewardConfig(name="flag_decision", params={"miss_cost": 7.0})], env)
    assert rubric.items[0].params["miss_cost"] == 7.0  # the recipe's params win
    assert Rubric.from_config([], env).items[0].params == {"miss_cost": 3.0, "false_alarm_cost": 1.0}


def test_bad_param_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="flag_decision") as e:
        Rubric.from_config([{"name": "flag_decision", "params": {"miss_cots": 2.0}}], ENV)
    msg = str(e.value)
    assert "miss_cots" in msg and "miss_cost" in msg and "false_alarm_cost" in msg
    with pytest.raises(ValueError, match=r"valid params: \(none\)"):
        Rubric.from_config([{"name": "answer_format", "params": {"strict": True}}], ENV)


def test_bad_configs() -> None:
    with pytest.raises(PluginError, match="flag_decison"):
        Rubric.from_config([{"name": "flag_decison"}], ENV)
    with pytest.raises(ValueError, match="unique"):
        Rubric.from_config([{"name": "answer_format"}, {"name": "answer_format"}], ENV)
    with pytest.raises(ValueError, match="weight"):
        Rubric.from_config([{"name": "answer_format", "weight": math.inf}], ENV)
    with pytest.raises(ValueError, match="completion, reference, outcome"):
        RubricItem("no_args", lambda: 1.0)
    with pytest.raises(ValueError, match="required parameter 'threshold'"):
        RubricItem("unfilled", lambda completion, reference, outcome, threshold: 1.0)
    RubricItem("two_args", lambda completion, reference: 1.0)  # reference and outcome go by name: fine
    with pytest.raises(ValueError, match="timeout_s"):
        default_rubric(timeout_s=0)


def test_reward_fn_records_range() -> None:
    assert get_reward("flag_rule").reward_range == (0.0, 1.0)
    with pytest.raises(ValueError, match="lo <= hi"):
        reward_fn(range=(1.0, 0.0))


def flaky(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
    """Raises on clear tasks."""
    if reference["label"] == "CLEAR":
        raise KeyError("boom on clear")
    return 1.0


@pytest.mark.parametrize("workers", [0, 2])
def test_raising_reward_fails_its_rollouts(caplog: pytest.LogCaptureFixture, workers: int) -> None:
    rubric = Rubric(
        [RubricItem("flaky", flaky, 2.0), RubricItem("fmt", get_reward("answer_format"), 1.0)],
        workers=workers,
    )
    groups = oracle_groups()
    with caplog.at_level(logging.WARNING, logger="rltk.reward"):
        m = rubric.score(groups)
    rubric.close()
    n_clear = sum(r.task.reference["label"] == "CLEAR" for r in rollouts(groups))
    assert m["reward/flaky/errors"] == m["reward/flaky/failed"] == n_clear and m["reward/flaky/mean"] == 1.0
    for r in rollouts(groups):
        clear = r.task.reference["label"] == "CLEAR"
        assert r.scores["flaky"] == (None if clear else 1.0)
        assert r.failed == clear  # a failure is not a score of 0: the rollout leaves the update
        assert math.isnan(r.reward) if clear else r.reward == 3.0
        if clear:
            assert [(f.source, f.kind) for f in r.failures] == [("flaky", "raised")]
            assert "boom on clear" in r.failures[0].detail
    assert m["reward/total/mean"] == 3.0  # over the rollouts that did not fail
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per reward per step, not one per sample
    assert "flaky" in warnings[0].getMessage() and "boom on clear" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rltk.reward"):
        rubric.score(groups)  # next step warns again
    assert len([rec for rec in caplog.records if rec.levelno == logging.WARNING]) == 1


def test_hanging_reward_times_out() -> None:
    def hangs_on_flag(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
        if reference["label"] == "FLAG":
            if reference["rule"] == "R1":
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # a busy loop, not just a sleep
                    pass
                return 2.0
            try:
                time.sleep(30)
            except Exception:  # a reward cannot swallow the timeout
                return 5.0
        return 1.0

    rubric = Rubric([RubricItem("hangs", hangs_on_flag)], timeout_s=0.2, workers=0)  # SIGALRM, in-process
    groups = oracle_groups(n=4, g=1)
    n_flag = sum(r.task.reference["label"] == "FLAG" for r in rollouts(groups))
    assert n_flag == 2
    t0 = time.monotonic()
    m = rubric.score(groups)
    assert time.monotonic() - t0 < 0.2 * n_flag + 3.0  # an unguarded call would take 10 s or 30 s
    assert m["reward/hangs/timeouts"] == n_flag and m["reward/hangs/errors"] == 0
    assert [r.scores["hangs"] for r in rollouts(groups)] == [
        None if r.task.reference["label"] == "FLAG" else 1.0 for r in rollouts(groups)
    ]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.default_int_handler, None)


def test_outer_timer_is_restored() -> None:
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        Rubric([RubricItem("fmt", get_reward("answer_format"), isolated=False)], timeout_s=0.2).score(
            oracle_groups(2, 1)
        )
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90.0 < left <= 100.0
        assert signal.getsignal(signal.SIGALRM) is not old
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_no_timeout_off_the_main_thread(caplog: pytest.LogCaptureFixture) -> None:
    def slow(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
        time.sleep(0.3)
        return 1.0

    rubric = Rubric([RubricItem("slow", slow)], timeout_s=0.2, workers=0)
    out: dict[str, float] = {}
    with caplog.at_level(logging.WARNING, logger="rltk.reward"):
        t = threading.Thread(target=lambda: out.update(rubric.score(oracle_groups(1, 1))))
        t.start()
        t.join()
    assert out["reward/slow/mean"] == 1.0 and out["reward/slow/timeouts"] == 0
    assert any("no reward timeout" in rec.getMessage() for rec in caplog.records)


def guard_step(rubric: Rubric, groups: list[Group], guard: FailureGuard) -> None:
    """What the trainer does with one step's scores: count failures per source, let the guard decide."""
    rubric.score(groups)
    rs = rollouts(groups)
    counts = {it.name: sum(any(f.source == it.name for f in r.failures) for r in rs) for it in rubric.items}
    guard.check(len(rs), counts, [(f, r.turns[-1]) for r in rs for f in r.failures])


def test_failing_reward_stops_the_run_naming_it() -> None:
    def broken(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
        return reference["missing_key"]

    rubric = Rubric([RubricItem("fmt", get_reward("answer_format")), RubricItem("broken", broken)], workers=0)
    with pytest.raises(RewardError, match=r"'broken' failed on 4 of 4 rollouts.*KeyError\('missing_key'\)"):
        guard_step(rubric, oracle_groups(2, 2), FailureGuard(0.05, 256))

    def sleeps(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> float:
        time.sleep(5)
        return 1.0

    with pytest.raises(RewardError, match=r"'sleeps'.*timeout"):
        guard_step(Rubric([RubricItem("sleeps", sleeps)], timeout_s=0.2, workers=0), oracle_groups(1, 2),
                   FailureGuard(0.05, 256))  # fmt: skip


def test_guard_rates_per_step_and_over_the_window() -> None:
    lenient = FailureGuard(max_rate=0.99, window=10**6)
    lenient.check(32, {"r": 8}, [])  # a quarter of one step is the most allowed
    with pytest.raises(RewardError, match=r"'r' failed on 9 of 32 rollouts \(28.1% > 25% of one step"):
        lenient.check(32, {"r": 9}, [])
    guard = FailureGuard(max_rate=0.05, window=64)
    guard.check(32, {"r": 2}, [])  # 2 failures: not yet a rate
    with pytest.raises(RewardError, match=r"4 of 64 rollouts \(6.2% > rollout.max_reward_error_rate"):
        guard.check(32, {"r": 2}, [])
    aging = FailureGuard(max_rate=0.05, window=64)
    for failed in ({"r": 2}, {}, {}, {"r": 2}):  # the first two failures leave the 64-rollout window
        aging.check(32, failed, [])
    with pytest.raises(RewardError, match="the env"):
        aging.check(32, {"env": 9}, [])


def test_bad_return_values_and_read_only_reference() -> None:
    def bad_value(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> Any:
        return {"CLEAR": "high", "FLAG": math.nan}[reference["label"]] if completion != "CLEAR" else 0.5

    def mutates(completion: str, reference: Any, outcome: Mapping[str, Any]) -> float:
        reference["label"] = "CLEAR"
        return 1.0

    groups = make_groups([["CLEAR", "FLAG R1"]] * 4)
    m = Rubric([RubricItem("bad_value", bad_value)], workers=0).score(groups)
    assert m["reward/bad_value/invalid"] == 4 and m["reward/bad_value/errors"] == 0
    assert m["reward/bad_value/mean"] == 0.5
    labels = [g.task.reference["label"] for g in groups]
    m = Rubric([RubricItem("bad_value", bad_value), RubricItem("mutates", mutates)], workers=0).score(groups)
    assert m["reward/mutates/errors"] == 8
    assert all(
        any(f.source == "mutates" and "TypeError" in f.detail for f in r.failures) for r in rollouts(groups)
    )
    assert [g.task.reference["label"] for g in groups] == labels


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (7.0, "outside its declared range"),
        (-0.5, "outside its declared range"),
        (True, "bool"),
        ("1.0", "str"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (1e308, "outside"),
        ([1.0], "list"),
    ],
)
def test_invalid_values_are_failures(value: Any, detail: str) -> None:
    @reward_fn(range=(0.0, 1.0))
    def returns(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> Any:
        return value

    groups = oracle_groups(1, 2)
    Rubric([RubricItem("r", returns)], workers=0).score(groups)
    for r in rollouts(groups):
        assert [(f.source, f.kind) for f in r.failures] == [("r", "invalid")] and detail in r.failures[
            0
        ].detail
        assert r.scores["r"] is None and math.isnan(r.reward)


def test_values_within_tolerance_and_numpy_scalars_are_scores() -> None:
    import numpy as np

    for value, want in ((1.0 + 1e-9, 1.0 + 1e-9), (np.float64(0.25), 0.25), (np.int64(1), 1.0), (0, 0.0)):

        @reward_fn(range=(0.0, 1.0))
        def returns(completion: str, reference: Mapping[str, Any], outcome: Mapping[str, Any]) -> Any:
            return value  # noqa: B023 (called right away)

        groups = oracle_groups(1, 2)
        Rubric([RubricItem("r", returns)], workers=0).score(groups)
        assert [r.reward for r in rollouts(groups)] == [want, want] and not rollouts(groups)[0].failed


def test_undeclared_range_caps_the_magnitude() -> None:
    groups = oracle_groups(1, 2)
    Rubric([RubricItem("huge", lambda c, r, o: 1e30)], workers=0).score(groups)
    assert all(f.kind == "invalid" and "declare its range" in f.detail for f in rollouts(groups)[0].failures)


def test_range_follows_the_params() -> None:
    env = PolicyFlaggingEnv()
    tasks = [t for t in env.tasks("eval", 40) if t.reference["label"] == "FLAG"][:1]
    groups = make_groups([["CLEAR", "garbage"]], tasks)  # a miss and a parse failure: both -miss_cost
    rubric = Rubric.from_config([{"name": "flag_decision", "params": {"miss_cost": 5.0}}], env, workers=0)
    assert rubric.items[0].range == (-5.0, 1.0)
    rubric.score(groups)
    assert [r.reward for r in rollouts(groups)] == [-5.0, -5.0]  # the most penalised rollouts are scores
    refund = Rubric.from_config([{"name": "refund_harm", "params": {"penalty": 3.0}}], env, workers=0)
    assert refund.items[0].range == (-3.0, 0.0)
