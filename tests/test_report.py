"""The proof report: estimators against brute force, a best-of-N selector that never reads the reference,
deterministic bootstrap intervals, the report's numbers on tiny models, and ``rltk eval --compare``."""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_model
from env_contract import _TEACHER_RUNNING, GuardedReference, ReferenceRead

from rltk import estimators, plugins, report, report_build, report_render
from rltk.bestofn import Candidate, Pick, select
from rltk.chat import render_prompt
from rltk.cli import main
from rltk.env import Env, Task
from rltk.progress import Progress
from rltk.reward import Rubric

EASY = {"difficulty": "easy"}


@pytest.fixture
def rubrics() -> Iterator[dict[str, Rubric]]:
    """Rubrics made by ``_rubric`` in a test, closed after it (their worker processes stopped)."""
    made: dict[str, Rubric] = {}
    yield made
    for r in made.values():
        r.close()


def _env_and_rubric(rubrics: dict[str, Rubric], name: str, options: dict | None = None) -> tuple[Env, Rubric]:
    env = plugins.make_env(name, dict(options or {}))
    rubrics[name] = rubrics.get(name) or Rubric.from_config([], env)
    return env, rubrics[name]


# ----------------------------------------------------------------------------------------------- estimators


def _brute(n: int, c: int, k: int) -> tuple[float, float]:
    """Fraction of the k-subsets of n samples (c right) with any right, and with all right."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return (sum(any(s) for s in subsets) / len(subsets), sum(all(s) for s in subsets) / len(subsets))


def test_pass_at_k_and_pass_hat_k_match_brute_force_enumeration() -> None:
    checked = 0
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                any_right, all_right = _brute(n, c, k)
                assert estimators.pass_at_k(n, c, k) == pytest.approx(any_right, abs=1e-12), (n, c, k)
                assert estimators.pass_hat_k(n, c, k) == pytest.approx(all_right, abs=1e-12), (n, c, k)
                checked += 1
    assert checked == sum((n + 1) * n for n in range(1, 7))


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5), (0, 0, 1)])
def test_estimators_reject_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="1 <= k <= n"):
        estimators.pass_at_k(n, c, k)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        estimators.pass_hat_k(n, c, k)


def test_ks_are_powers_of_two_then_n() -> None:
    assert estimators.ks(1) == [1]
    assert estimators.ks(2) == [1, 2]
    assert estimators.ks(5) == [1, 2, 4, 5]
    assert estimators.ks(8) == [1, 2, 4, 8]
    assert estimators.ks(12) == [1, 2, 4, 8, 12]
    for n in range(1, 40):
        out = estimators.ks(n)
        assert out[-1] == n and out == sorted(set(out))
        assert all(k & (k - 1) == 0 for k in out[:-1])


def test_curve_averages_per_task_brute_force() -> None:
    n, counts = 6, [0, 1, 3, 6, 2]
    out = estimators.curve(n, counts)
    assert list(out["pass_at_k"]) == list(out["pass_hat_k"]) == [1, 2, 4, 6]
    for k in estimators.ks(n):
        brute = [_brute(n, c, k) for c in counts]
        assert out["pass_at_k"][k] == pytest.approx(sum(b[0] for b in brute) / len(counts))
        assert out["pass_hat_k"][k] == pytest.approx(sum(b[1] for b in brute) / len(counts))
    assert out["pass_at_k"][1] == pytest.approx(sum(counts) / (n * len(counts)))
    assert out["pass_hat_k"][1] == pytest.approx(sum(counts) / (n * len(counts)))


# ---------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_intervals_are_deterministic_per_seed() -> None:
    values = np.random.default_rng(7).normal(size=30).tolist()
    a = estimators.bootstrap_mean(values, seed=3)
    assert a == estimators.bootstrap_mean(values, seed=3)
    b = estimators.bootstrap_mean(values, seed=4)
    assert a[0] == b[0] == pytest.approx(float(np.mean(values)))
    assert a[1:] != b[1:]  # another resample, another interval (continuous values: almost surely)
    assert a[1] < a[0] < a[2]
    other = np.random.default_rng(8).normal(size=30).tolist()
    assert estimators.paired_difference(values, other, seed=5) == estimators.paired_difference(
        values, other, seed=5
    )
    assert estimators.paired_difference(values, other, seed=5) != estimators.paired_difference(
        values, other, seed=6
    )
    assert all(math.isnan(x) for x in estimators.bootstrap_mean([]))


def test_paired_difference_known_cases() -> None:
    same = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    assert estimators.paired_difference(same, same) == (0.0, 0.0, 0.0)
    assert estimators.paired_difference([1] * 9, [0] * 9) == (1.0, 1.0, 1.0)
    assert estimators.paired_difference([0] * 9, [1] * 9) == (-1.0, -1.0, -1.0)
    # Paired: a constant shift over widely varying tasks has a zero-width interval (unpaired would not).
    x = np.random.default_rng(1).uniform(0, 10, size=25)
    diff, low, high = estimators.paired_difference((x + 0.5).tolist(), x.tolist())
    assert diff == pytest.approx(0.5) and low == pytest.approx(0.5) and high == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same tasks"):
        estimators.paired_difference([1, 0, 1], [1, 0])


# --------------------------------------------------------------------------------------------- the selector


def test_select_majority_vote_and_abstention() -> None:
    c = [
        Candidate("CLEAR", -0.1),
        Candidate("FLAG R1", -0.9),
        Candidate(None, -0.01),
        Candidate("FLAG R1", -0.5),
    ]
    pick = select(c)
    assert pick == Pick(index=3, answer="FLAG R1", abstained=1)  # majority; its best-log-prob sample


def test_select_all_abstain_picks_highest_mean_logp() -> None:
    pick = select([Candidate(None, -2.0), Candidate(None, -0.3), Candidate(None, -1.0)])
    assert pick == Pick(index=1, answer=None, abstained=3)


def test_select_tie_goes_to_higher_mean_logp() -> None:
    pick = select([Candidate("A", -1.0), Candidate("B", -0.4), Candidate("A", -3.0), Candidate("B", -2.0)])
    assert (pick.index, pick.answer) == (1, "B")
    pick = select([Candidate("A", -0.2), Candidate("B", -0.4), Candidate("A", -3.0), Candidate("B", -2.0)])
    assert (pick.index, pick.answer) == (0, "A")
    # A majority beats a more confident minority.
    pick = select([Candidate("A", -5.0), Candidate("B", -0.1), Candidate("A", -4.0)])
    assert (pick.index, pick.answer) == (2, "A")


def test_select_composes_per_field_majorities() -> None:
    c = [
        Candidate({"a": 1, "b": "x", "c": None}, -1.0),
        Candidate({"a": 2, "b": "y", "c": 5}, -0.5),
        Candidate({"a": 1, "b": "y"}, -2.0),  # c: its value did not normalize, that field abstains
        Candidate(None, -0.1),
    ]
    pick = select(c, compose=True)
    assert pick.index is None and pick.abstained == 1
    # a: 1 (2 votes); b: y (2 votes); c: tie None/5 → 5, whose best sample has the higher log-prob
    assert pick.answer == {"a": 1, "b": "y", "c": 5}


def test_select_multi_turn_picks_the_sample_agreeing_with_most_fields() -> None:
    c = [
        Candidate({"a": 1, "b": "x"}, -0.1),  # agrees on a only
        Candidate({"a": 2, "b": "y"}, -0.2),  # agrees on b only
        Candidate({"a": 1, "b": "y"}, -3.0),  # agrees on both: chosen despite the lowest log-prob
        Candidate({"a": 1, "b": "y"}, -2.5),  # ...and its twin with a higher one wins the tie
        Candidate({"a": 3, "b": "z"}, -0.05),
    ]
    pick = select(c, compose=False)
    assert pick.index == 3 and pick.answer == {"a": 1, "b": "y"} and pick.abstained == 0


# ------------------------------------------------------------------------- best-of-N without the reference


@pytest.fixture
def guard_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """While best-of-N selects (all of ``report.best_of_n`` but the env's judging of a composed answer),
    ``Env.final_answer`` (any env) or the selector runs, reading a guarded reference raises."""

    def guarded(fn):
        def call(*args, **kwargs):
            _TEACHER_RUNNING.append(True)
            try:
                return fn(*args, **kwargs)
            finally:
                _TEACHER_RUNNING.pop()

        return call

    def unguarded(fn):  # the env judging the composed answer reads the reference, as it must
        def call(*args, **kwargs):
            saved = list(_TEACHER_RUNNING)
            _TEACHER_RUNNING.clear()
            try:
                return fn(*args, **kwargs)
            finally:
                _TEACHER_RUNNING.extend(saved)

        return call

    monkeypatch.setattr(report, "select", guarded(report.select))
    monkeypatch.setattr(report, "best_of_n", guarded(report.best_of_n))
    monkeypatch.setattr(report, "judge", unguarded(report.judge))
    for name in ("policy_flagging", "invoice_extraction", "doc_search_qa"):
        cls = type(plugins.make_env(name, {}))
        monkeypatch.setattr(cls, "final_answer", guarded(cls.final_answer))


def _guarded(tasks: list[Task]) -> list[Task]:
    return [replace(t, reference=GuardedReference(t.reference)) for t in tasks]


def _no_reference(tasks: list[Task]) -> list[Task]:
    return [replace(t, reference={}) for t in tasks]


def test_guard_catches_a_selector_that_reads_the_reference() -> None:
    """The guard itself works: a read of a guarded reference while selecting raises."""
    task = _guarded(plugins.make_env("policy_flagging", {}).tasks("eval", 1))[0]
    _TEACHER_RUNNING.append(True)
    try:
        with pytest.raises(ReferenceRead):
            task.reference.get("label")
    finally:
        _TEACHER_RUNNING.pop()


def _pick_from_answers(env: Env, row: list[report.Attempt], answers: list) -> Pick:
    candidates = [
        Candidate(ans, a.mean_logp if a.mean_logp is not None else 0.0)
        for a, ans in zip(row, answers, strict=True)
    ]
    return select(candidates, compose=env.max_turns <= 1 and any(isinstance(x, dict) for x in answers))


@pytest.mark.parametrize(("name", "options"), [("policy_flagging", {}), ("invoice_extraction", EASY)])
def test_best_of_n_picks_identical_without_the_reference_scripted(
    rubrics: dict[str, Rubric], guard_selection: None, name: str, options: dict
) -> None:
    """Samples from the env's scripts (answers that parse and disagree): the selector's picks are the same
    when each answer is re-read from tasks whose reference is empty, and it never reads a guarded one."""
    from rltk.evaluate import policy_rollouts

    env, rubric = _env_and_rubric(rubrics, name, options)
    tasks = env.tasks("eval", 8 if name == "policy_flagging" else 6)
    policies = [env.oracle, env.teacher(), *env.baselines().values()]
    samples, turns = [], []
    for t, task in enumerate(tasks):
        row, acts = [], []
        for j, policy in enumerate(policies):
            rollout = policy_rollouts(env, rubric, [task], policy)[0]
            a = report.attempt_of(env, rollout, None)
            a.mean_logp = -0.1 * ((j + t) % len(policies)) - 0.01 * j  # distinct, varying per task
            a.generated_tokens, a.context_tokens = 10 + j, 100
            row.append(a)
            acts.append(rollout.turns)
        samples.append(row)
        turns.append(acts)
    n = len(policies)
    empty = _no_reference(tasks)
    voted = 0
    for t, row in enumerate(samples):
        with_ref = _pick_from_answers(env, row, [a.answer for a in row])
        without = _pick_from_answers(env, row, [env.final_answer(empty[t].messages, x) for x in turns[t]])
        assert with_ref == without
        voted += with_ref.answer is not None
    assert voted == len(tasks)  # the scripts' answers parse: a real vote on every task
    picks = report.best_of_n(env, rubric, _guarded(tasks), samples, n)
    again = report.best_of_n(env, rubric, tasks, samples, n)
    assert picks == again
    for t, (row, pick) in enumerate(zip(samples, picks, strict=True)):
        chosen = _pick_from_answers(env, row, [a.answer for a in row])
        assert pick.generated_tokens == sum(a.generated_tokens for a in row)
        if chosen.index is not None:
            assert pick.answer == chosen.answer == row[chosen.index].answer
            assert (pick.correct, pick.mean_logp) == (row[chosen.index].correct, row[chosen.index].mean_logp)
        else:
            composed = env.compose_answer(chosen.answer)
            assert pick.correct == env.check(tasks[t], composed)["correct"]


@pytest.mark.parametrize(
    ("name", "options", "n_tasks"), [("policy_flagging", {}, 8), ("invoice_extraction", EASY, 6)]
)
def test_model_best_of_n_never_reads_the_reference(
    tokenizer,
    rubrics: dict[str, Rubric],
    guard_selection: None,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    options: dict,
    n_tasks: int,
) -> None:
    """A tiny model's sampled attempts on guarded tasks: the picks equal those made from the same turns
    re-read with the reference removed."""
    env, rubric = _env_and_rubric(rubrics, name, options)
    tasks = env.tasks("eval", n_tasks)
    turns: dict[int, list[str]] = {}
    real_attempt_of = report.attempt_of

    def recording(env_, rollout, prompt_len):
        a = real_attempt_of(env_, rollout, prompt_len)
        turns[id(a)] = list(rollout.turns)
        return a

    monkeypatch.setattr(report, "attempt_of", recording)
    settings = report.ReportSettings(samples=4, bon=4, max_new_tokens=8, batch_size=16, seed=1)
    result = report.evaluate_model(
        make_tiny_model(tokenizer), tokenizer, env, rubric, _guarded(tasks), settings, "m", "tiny"
    )
    assert result.samples is not None and result.best_of_n is not None
    assert len(result.samples) == n_tasks and all(len(r) == 4 for r in result.samples)
    empty = _no_reference(tasks)
    for t, (row, pick) in enumerate(zip(result.samples, result.best_of_n, strict=True)):
        with_ref = _pick_from_answers(env, row, [a.answer for a in row])
        without = _pick_from_answers(
            env, row, [env.final_answer(empty[t].messages, turns[id(a)]) for a in row]
        )
        assert with_ref == without
        assert pick.generated_tokens == sum(a.generated_tokens for a in row)
        if with_ref.index is not None:
            assert pick.mean_logp == row[with_ref.index].mean_logp
            assert pick.correct == row[with_ref.index].correct


def test_invoice_best_of_n_composes_fields_and_the_env_judges_it(rubrics: dict[str, Rubric]) -> None:
    """Three samples, each with a different field wrong: none is right, their per-field majority is."""
    env, rubric = _env_and_rubric(rubrics, "invoice_extraction", EASY)
    task = env.tasks("eval", 1)[0]
    gold = json.loads(env.oracle(task.messages))
    wrongs = {"vendor": "Nobody Ltd", "date": "1999-01-02", "total": 1.23}
    texts = [json.dumps({**gold, k: v}) for k, v in wrongs.items()]
    samples = [
        report.Attempt(
            correct=env.check(task, text)["correct"],
            reward=0.0,
            scores={},
            env_cost=None,
            generated_tokens=20 + i,
            context_tokens=200,
            turns=1,
            tool_calls=0,
            mean_logp=[-0.1, -0.2, -0.3][i],
            answer=env.final_answer(task.messages, [text]),
        )
        for i, text in enumerate(texts)
    ]
    assert not any(a.correct for a in samples)
    pick = select([Candidate(a.answer, a.mean_logp) for a in samples], compose=True)
    assert pick.index is None and pick.answer == env.final_answer(task.messages, [json.dumps(gold)])
    [best] = report.best_of_n(env, rubric, [task], [samples], 3)
    assert best.correct
    assert best.answer == pick.answer  # the judged answer is the composed one
    assert (best.generated_tokens, best.context_tokens, best.turns) == (63, 600, 3)
    # Best-of-2 of the first two: every field is a 1-1 tie or agreed; ties go to sample 0 → its wrong vendor.
    [best2] = report.best_of_n(env, rubric, [task], [samples], 2)
    assert not best2.correct and best2.generated_tokens == 41


# ------------------------------------------------------------------------------------------------ the report


def test_field_errors_name_what_the_teacher_gets_wrong(rubrics: dict[str, Rubric]) -> None:
    env, rubric = _env_and_rubric(rubrics, "invoice_extraction", EASY)
    tasks = env.tasks("eval", 12)
    built = report_build.build_report(
        env, tasks, report.scripted_policies(env, rubric, tasks), report.ReportSettings(), {}
    )
    rows = {p["name"]: p["greedy"]["field_errors"] for p in built["policies"]}
    plain = sum(t.info["layout"] == "plain" for t in tasks) / len(tasks)
    assert 0 < plain < 1
    # the teacher misses exactly the letterhead vendors and nothing else; the oracle misses nothing
    assert rows["teacher"] == {k: plain if k == "vendor" else 0.0 for k in rows["oracle"]}
    assert set(rows["oracle"].values()) == {0.0} and "vendor" in rows["oracle"]
    assert "## Fields wrong" in report_render.markdown(built)


def _report(
    tokenizer,
    env: Env,
    rubric: Rubric,
    tasks: list[Task],
    settings: report.ReportSettings,
    models: tuple[tuple[int, str], ...] = ((0, "base"), (1, "rl")),
) -> tuple[dict, list[report.PolicyEval]]:
    """The report of fresh tiny models (model seed, name) and the env's scripted policies."""
    rows = [
        report.evaluate_model(
            make_tiny_model(tokenizer, seed=s), tokenizer, env, rubric, tasks, settings, n, n
        )
        for s, n in models
    ]
    rows += report.scripted_policies(env, rubric, tasks)
    return report_build.build_report(env, tasks, rows, settings, {"split": "eval"}), rows


def test_report_numbers_on_tiny_models(tokenizer, rubrics: dict[str, Rubric]) -> None:
    env, rubric = _env_and_rubric(rubrics, "policy_flagging")
    tasks = env.tasks("eval", 8)
    settings = report.ReportSettings(samples=4, bon=4, max_new_tokens=6, seed=0)
    built, rows = _report(tokenizer, env, rubric, tasks, settings)
    assert built["teacher_sha256"] == env.teacher().source_sha256()
    assert len(built["teacher_sha256"]) == 64
    by_name = {p["name"]: p for p in built["policies"]}
    assert list(by_name)[:4] == ["base", "rl", "teacher", "oracle"] and list(by_name)[4].startswith(
        "trivial: "
    )
    for p in built["policies"]:
        g = p["greedy"]
        assert g["tasks"] == 8 and 0.0 <= g["accuracy"] <= 1.0
        low, high = g["ci95"]
        assert low <= g["accuracy"] <= high
        assert {"generated_tokens", "context_tokens", "turns", "tool_calls"} <= set(g)
    assert by_name["oracle"]["greedy"]["accuracy"] == 1.0
    for name in ("teacher", "oracle"):
        assert by_name[name]["greedy"]["generated_tokens"] is None
        assert by_name[name]["sampled"] is None and by_name[name]["best_of_n"] is None
    for row, name in zip(rows[:2], ("base", "rl"), strict=True):
        p = by_name[name]
        sm, bon = p["sampled"], p["best_of_n"]
        assert set(sm["pass_at_k"]) == set(sm["pass_hat_k"]) == {"1", "2", "4"}  # as JSON reads back
        counts = [sum(a.correct for a in r) for r in row.samples]
        assert sm["pass_at_k"] == {str(k): v for k, v in estimators.curve(4, counts)["pass_at_k"].items()}
        assert sm["pass_hat_k"]["4"] == sum(c == 4 for c in counts) / 8
        assert bon["n"] == 4 and bon["tasks"] == 8
        per_task = [sum(a.generated_tokens for a in r[:4]) for r in row.samples]
        assert bon["generated_tokens"] == pytest.approx(sum(per_task) / 8)
        assert bon["generated_tokens"] == pytest.approx(4 * sm["generated_tokens"])
        assert bon["pass_at_n_upper_bound"] == sum(c > 0 for c in counts) / 8
        assert bon["accuracy"] <= bon["pass_at_n_upper_bound"]
        # a single-turn greedy attempt reads its prompt once
        for task, a in zip(tasks, row.greedy, strict=True):
            assert a.turns == 1 and a.tool_calls == 0
            assert a.context_tokens == len(render_prompt(tokenizer, task.messages, tools=task.tools))
            assert 1 <= a.generated_tokens <= 6
    diffs = built["differences"]
    assert all(d["a"] == "rl greedy" for d in diffs)
    others = [f"{n} greedy" for n in by_name if n != "rl"] + ["base best-of-4", "rl best-of-4"]
    assert sorted(d["b"] for d in diffs) == sorted(others)
    teacher = next(d for d in diffs if d["b"] == "teacher greedy")
    mine = [float(a.correct) for a in rows[1].greedy]
    theirs = [float(a.correct) for a in rows[2].greedy]
    assert teacher["diff"] == pytest.approx(sum(mine) / 8 - sum(theirs) / 8)
    assert [teacher["diff"], *teacher["ci95"]] == list(estimators.paired_difference(mine, theirs, 0))
    json.dumps(built)  # JSON-ready
    md = report_render.markdown(built)
    assert report_render.markdown(json.loads(json.dumps(built))) == md  # the same from report.json
    assert "best-of-4" in md and "## Differences" in md
    # per-tag accuracy with each tag's number of tasks
    rules = [f"rule={t.info['rule']}" for t in tasks]
    assert built["tag_tasks"] and {t: rules.count(t) for t in set(rules)} == {
        t: n for t, n in built["tag_tasks"].items() if t.startswith("rule=")
    }
    for t, n in built["tag_tasks"].items():
        assert f"| {t} ({n}) |" in md
        share = by_name["rl"]["greedy"]["by_tag"][t] * n
        assert share == pytest.approx(round(share))  # a share of exactly n tasks


def test_report_is_deterministic(tokenizer, rubrics: dict[str, Rubric]) -> None:
    env, rubric = _env_and_rubric(rubrics, "policy_flagging")
    tasks = env.tasks("eval", 6)
    settings = report.ReportSettings(samples=2, bon=2, max_new_tokens=4, seed=3)
    a, rows_a = _report(tokenizer, env, rubric, tasks, settings, ((1, "rl"),))
    b, rows_b = _report(tokenizer, env, rubric, tasks, settings, ((1, "rl"),))
    assert a["timings"]["seconds_per_task"].keys() == b["timings"]["seconds_per_task"].keys()
    a.pop("timings"), b.pop("timings")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)

    def logps(rows: list[report.PolicyEval]) -> list[float | None]:
        return [x.mean_logp for p in rows if p.kind == "model" for r in p.samples or [] for x in r]

    assert logps(rows_a) == logps(rows_b) and len(logps(rows_a)) == 12
    other = report.ReportSettings(samples=2, bon=2, max_new_tokens=4, seed=4)
    rl = report.evaluate_model(
        make_tiny_model(tokenizer, seed=1), tokenizer, env, rubric, tasks, other, "rl", "rl"
    )
    assert logps(rows_a) != logps([rl])  # the seed drives the sampling


def test_multi_turn_report(tokenizer, rubrics: dict[str, Rubric], tmp_path: Path) -> None:
    env, rubric = _env_and_rubric(rubrics, "doc_search_qa", EASY)
    tasks = env.tasks("eval", 3)
    settings = report.ReportSettings(samples=2, bon=2, max_new_tokens=8, seed=0)
    model = report.evaluate_model(
        make_tiny_model(tokenizer), tokenizer, env, rubric, tasks, settings, "m", "tiny"
    )
    rows = [model, *report.scripted_policies(env, rubric, tasks)]
    built = report_build.build_report(env, tasks, rows, settings, {})
    by_name = {p["name"]: p for p in built["policies"]}
    teacher, oracle, m = by_name["teacher"]["greedy"], by_name["oracle"]["greedy"], by_name["m"]["greedy"]
    assert teacher["generated_tokens"] is None and teacher["context_tokens"] is None
    assert (
        teacher["turns"] >= 2 and teacher["tool_calls"] >= 1 and teacher["tool_calls"] == teacher["turns"] - 1
    )
    assert oracle["accuracy"] == 1.0 and oracle["tool_calls"] >= 1
    assert m["turns"] >= 1 and m["tool_calls"] is not None and m["generated_tokens"] > 0
    for a, task in zip(model.greedy, tasks, strict=True):
        prompt = len(render_prompt(tokenizer, task.messages, tools=task.tools))
        assert a.context_tokens >= a.turns * prompt  # each turn reads the prompt and all before it
        assert a.turns <= env.max_turns
    bon = by_name["m"]["best_of_n"]
    assert bon["turns"] == pytest.approx(sum(a.turns for r in model.samples for a in r) / 3)
    paths = report_render.write(tmp_path, built)
    md = paths[1].read_text()
    assert "tool calls" in md and "turns" in md
    assert paths[2].read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_compare_writes_the_report(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: str, tmp_path: Path
) -> None:
    out = tmp_path / "rep"
    args = ["eval", "--env", "policy_flagging", "--compare", f"a={tiny_model_dir}", "--n", "6"]
    assert main([*args, "--samples", "2", "--out", str(out)]) == 0
    built = json.loads((out / "report.json").read_text())
    assert built["tasks"] == 6 and built["settings"]["bon"] == 2
    assert [p["name"] for p in built["policies"]][:3] == ["a", "teacher", "oracle"]
    assert built["policies"][0]["source"] == tiny_model_dir
    md = (out / "report.md").read_text()
    assert "best-of-2" in md and "## Differences" in md and "a greedy" in md
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG")
    assert "wrote" in capsys.readouterr().out


def test_cli_compare_resumes_a_stopped_report(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: str, tmp_path: Path
) -> None:
    from rltk import compare

    played: list[str] = []
    real = compare.evaluate_spec

    def evaluate_spec(spec: compare.ModelSpec, *args: object) -> report.PolicyEval:
        played.append(spec.name)
        if spec.name == "b" and stop:
            raise KeyboardInterrupt  # stopped while playing the second model
        return real(spec, *args)

    monkeypatch.setattr(compare, "evaluate_spec", evaluate_spec)
    args = ["eval", "--env", "policy_flagging", "--n", "4", "--samples", "2", "--max-new-tokens", "4"]
    specs = ["--compare", f"a={tiny_model_dir}", f"b={tiny_model_dir}"]

    def report_of(out: Path) -> dict:
        built = json.loads((out / "report.json").read_text())
        built.pop("timings")
        return built

    stop = False
    assert main([*args, *specs, "--out", str(tmp_path / "whole")]) == 0
    stop, played = True, []
    with pytest.raises(KeyboardInterrupt):
        main([*args, *specs, "--out", str(tmp_path / "rep")])
    assert played == ["a", "b"] and len(list((tmp_path / "rep" / compare.PARTIAL).glob("a-*.pkl"))) == 1
    stop, played = False, []
    assert main([*args, *specs, "--out", str(tmp_path / "rep")]) == 0
    assert played == ["b"]  # a's row was kept
    assert report_of(tmp_path / "rep") == report_of(tmp_path / "whole")
    assert not (tmp_path / "rep" / compare.PARTIAL).exists()
    # a kept row is reused only under the same key: other settings, or an unreadable file, play it again
    stop, played = True, []
    with pytest.raises(KeyboardInterrupt):
        main([*args, *specs, "--out", str(tmp_path / "rep")])
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--seed", "1", *specs, "--out", str(tmp_path / "rep")])
    (kept,) = (tmp_path / "rep" / compare.PARTIAL).glob("a-*.pkl")  # the seed-0 row was replaced
    kept.write_bytes(b"truncated")
    stop, played = False, []
    assert main([*args, "--seed", "1", *specs, "--out", str(tmp_path / "rep")]) == 0
    assert played == ["a", "b"]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--compare", "foo", "--out", "OUT"], "'foo' is not NAME=MODEL"),
        (["--compare", "a=MODEL", "a=MODEL", "--out", "OUT"], "name 'a' is used twice"),
        (["--compare", "teacher=MODEL", "--out", "OUT"], "'teacher' is reserved"),
        (["--compare", "a=MODEL@5", "--out", "OUT"], "@STEP needs an rltk run dir"),
        (["--compare", "a=MODEL", "--bon", "4", "--samples", "2", "--out", "OUT"], "bon=4"),
        (["--compare", "a=MODEL"], "needs --out"),
    ],
)
def test_cli_compare_bad_input(
    capsys: pytest.CaptureFixture[str], tiny_model_dir: str, tmp_path: Path, extra: list[str], expected: str
) -> None:
    out = tmp_path / "rep"
    extra = [x.replace("MODEL", tiny_model_dir).replace("OUT", str(out)) for x in extra]
    assert main(["eval", "--env", "policy_flagging", "--n", "2", *extra]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.startswith("error: ") and expected in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert not out.exists()  # nothing written, no model played


# ---------------------------------------------------------------------------------------- progress, verdict


def test_progress_writes_plain_lines_off_a_terminal() -> None:
    stream = io.StringIO()
    p = Progress("m: greedy", 20, stream=stream)
    for _ in range(20):
        p.update(1)
    p.close()
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 12  # about one per 10%, not one per item
    assert all(line.startswith("[m: greedy] ") for line in lines)
    assert "20/20" in lines[-1] and all("20/20" not in line for line in lines[:-1])
    assert "\r" not in stream.getvalue()
    stream = io.StringIO()
    p = Progress("x", 5, stream=stream)
    p.update(5)
    assert stream.getvalue().splitlines()[-1].startswith("[x] 5/5")


@pytest.mark.parametrize(
    ("diff", "ci", "word", "span"),
    [
        (0.05, [0.01, 0.09], "is better than", "+5.0 points [+1.0, +9.0]"),
        (-0.2, [-0.3, -0.1], "is worse than", "-20.0 points [-30.0, -10.0]"),
        (0.02, [-0.01, 0.05], "is not detectably different from", "+2.0 points [-1.0, +5.0]"),
        (0.0, [0.0, 0.0], "is not detectably different from", "+0.0 points [+0.0, +0.0]"),
    ],
)
def test_verdict_wording(diff: float, ci: list[float], word: str, span: str) -> None:
    d = {"a": "rl greedy", "b": "teacher greedy", "tasks": 50, "diff": diff, "ci95": ci}
    assert report_render.verdict(d) == f"rl greedy {word} teacher greedy: {span} on 50 tasks"
