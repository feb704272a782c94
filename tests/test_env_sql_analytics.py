"""The sql_analytics env and its reward: splits, oracle, safety of the SQL sandbox, baselines, canaries."""

from __future__ import annotations

import gc
import inspect
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_overrides
from env_contract import assert_splits_disjoint, assert_teacher_contract, guard_references
from rltk_envs.sql_analytics import (
    DIFFICULTIES,
    LEVELS,
    SqlAnalyticsEnv,
    _patterns,
    connect,
    read_prompt,
    schema,
)
from rltk_envs.sqlite_sandbox import Database, SqlError, same_result
from rltk_rewards.outcome import correct

from rltk.config import load_config
from rltk.env import Task, prompt_hash, run_policy
from rltk.evaluate import evaluate_policy
from rltk.plugins import get_env
from rltk.reward import Rubric
from rltk.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "sql_analytics_grpo.yaml")
DATA = json.loads((ROOT / "envs" / "data" / "sql_analytics.json").read_text())


@pytest.fixture(scope="module", params=DIFFICULTIES)
def env(request: pytest.FixtureRequest) -> SqlAnalyticsEnv:
    return SqlAnalyticsEnv(difficulty=request.param)


@pytest.fixture(scope="module")
def eval_tasks(env: SqlAnalyticsEnv) -> list[Task]:
    return env.tasks("eval", 200)


def score(env: SqlAnalyticsEnv, task: Task, turns: list[str]) -> tuple[float, dict]:
    """Play ``turns`` (the last one repeated) as a policy; return the reward and the env's verdict."""
    outcome = run_policy(env, task, lambda m: turns[min((len(m) - 2) // 2, len(turns) - 1)]).outcome
    return correct("", task.reference, outcome), outcome


def test_registered_under_its_name() -> None:
    assert get_env("sql_analytics") is SqlAnalyticsEnv
    assert SqlAnalyticsEnv.default_rewards == {"correct": 1.0}


def test_splits_never_overlap(env: SqlAnalyticsEnv) -> None:
    assert_splits_disjoint(env)


def test_determinism_and_stratification(env: SqlAnalyticsEnv, eval_tasks: list[Task]) -> None:
    again = SqlAnalyticsEnv(difficulty=env.difficulty).tasks("eval", 200)
    assert again == eval_tasks
    assert env.tasks("eval", 20) == eval_tasks[:20]  # prefix-stable
    other = env.tasks("eval", 40, seed=1)
    same = {prompt_hash(t.messages) for t in other} & {prompt_hash(t.messages) for t in eval_tasks[:40]}
    assert len(same) <= 4  # another seed, other tasks (a question may recur, on another database)
    assert {t.reference["db_seed"] for t in other}.isdisjoint(t.reference["db_seed"] for t in eval_tasks)
    assert len({t.id for t in eval_tasks}) == 200
    templates = Counter(t.info["template"] for t in eval_tasks)
    assert len(templates) == len(env.pool) and max(templates.values()) - min(templates.values()) <= 1
    levels = {t.info["difficulty"] for t in eval_tasks}
    assert levels == (set(LEVELS) if env.difficulty == "mixed" else {env.difficulty})
    assert {t.info["family"] for t in eval_tasks} == {"shop", "hr", "logistics"}


def test_oracle_scores_one_on_every_eval_task(env: SqlAnalyticsEnv, eval_tasks: list[Task]) -> None:
    result = evaluate_policy(env, Rubric.from_config([], env), eval_tasks, env.oracle, "oracle")
    assert result.accuracy == 1.0 and result.mean_reward == 1.0
    used_tool = [len(run_policy(env, t, env.oracle).actions) == 2 for t in eval_tasks]
    assert 0.3 < sum(used_tool) / len(used_tool) < 0.7  # both first turns occur (warm-start demonstrations)


def test_oracle_reads_the_question_text(eval_tasks: list[Task]) -> None:
    """The oracle's SQL follows the question's text (change a number there, and its SQL changes with it)."""
    env = SqlAnalyticsEnv()
    observed = [{"role": "assistant", "content": "<tool>run_sql: SELECT 1</tool>"}]
    observed.append({"role": "user", "content": "<result>1\n1</result>"})
    changed = 0
    for task in eval_tasks[:80]:
        assert env.oracle([*task.messages, *observed]) == f"<answer>{task.reference['sql']}</answer>"
        tables, question = read_prompt(task.messages)
        edited = re.sub(r"\b\d+\b", "4321", question, count=1)
        if edited != question:
            user = {"role": "user", "content": f"Tables:\n{tables}\n\nQuestion: {edited}"}
            answer = env.oracle([task.messages[0], user, *observed])
            assert "4321" in answer and answer != f"<answer>{task.reference['sql']}</answer>"
            changed += 1
    assert changed > 20


def test_every_question_matches_exactly_one_template_and_gold_is_sound(env: SqlAnalyticsEnv) -> None:
    for task in env.tasks("train", 300):
        tables, question = read_prompt(task.messages)
        assert sum(bool(p.fullmatch(question)) for p, _ in _patterns()[tables]) == 1, question
        gold = task.reference["gold"]
        assert 0 < len(gold) <= 20 and all(v is not None for row in gold for v in row)
        assert gold != [[0]]
        with connect(task.reference["family"], task.reference["db_seed"]) as db:  # the gold is reproducible
            assert same_result(db.run(task.reference["sql"], 50)[1], gold, ordered=True)


def test_prompt_shows_schema_and_question_only(eval_tasks: list[Task], tokenizer) -> None:
    for task in eval_tasks[:50]:
        tables, question = read_prompt(task.messages)
        assert question and tables == schema(task.reference["family"])
        assert task.reference["sql"] not in task.messages[1]["content"]
        assert "run_sql" in task.messages[0]["content"] and "<answer>" in task.messages[0]["content"]
    lengths = [
        len(tokenizer.apply_chat_template(t.messages, tokenize=True, add_generation_prompt=True)["input_ids"])
        for t in eval_tasks
    ]
    assert max(lengths) <= 250, max(lengths)


# ---- the SQL sandbox ----------------------------------------------------------------------------------


@pytest.fixture
def conn() -> Database:
    c = connect("logistics", 7)
    yield c
    c.close()


@pytest.mark.parametrize(
    "sql",
    [
        "ATTACH DATABASE '/tmp/x.db' AS x",
        "ATTACH DATABASE ':memory:' AS x",
        "PRAGMA table_info(shipments)",
        "PRAGMA writable_schema = 1",
        "SELECT * FROM pragma_table_info('shipments')",
        "INSERT INTO shipments (id) VALUES (999)",
        "UPDATE shipments SET weight = 0",
        "DELETE FROM shipments",
        "DROP TABLE shipments",
        "CREATE TABLE t (x)",
        "CREATE TEMP TABLE t (x)",
        "CREATE VIEW v AS SELECT 1",
        "ALTER TABLE shipments ADD COLUMN x",
        "BEGIN",
        "VACUUM",
        "SELECT load_extension('x')",
        "SELECT printf('%.*c', 2000000000, 'x')",
    ],
)
def test_writes_ddl_attach_and_pragma_are_refused(conn: Database, sql: str) -> None:
    with pytest.raises(SqlError):
        conn.run(sql, 10)
    assert conn.run("SELECT COUNT(*) FROM shipments", 10)[1][0][0] > 0  # nothing changed


@pytest.mark.parametrize(
    "sql",
    [
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT COUNT(*) FROM r",
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT * FROM r ORDER BY x DESC",
        "SELECT COUNT(*) FROM shipments a, shipments b, shipments c, shipments d",
        "SELECT a.id FROM shipments a, shipments b, shipments c, shipments d ORDER BY a.weight - d.days",
    ],
)
def test_runaway_queries_are_cut(conn: Database, sql: str) -> None:
    start = time.monotonic()
    with pytest.raises(SqlError, match="too slow"):
        conn.run(sql, 10)
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT length(randomblob(1000000000))",
        "SELECT zeroblob(100000000)",
        "SELECT replace(hex(zeroblob(4000)), '0', hex(zeroblob(4000)))",
        "WITH RECURSIVE w(s) AS (SELECT 'ab' UNION ALL SELECT s || s FROM w) SELECT max(length(s)) FROM w",
        "SELECT 1; SELECT 2",
        "SELECT 1 /* " + "x" * 3000 + " */",
        "",
        "   ;  ",
        "SELEC * FORM shipments",
        "SELECT char(55296)",
    ],
)
def test_oversized_values_several_statements_and_junk_are_errors(conn: Database, sql: str) -> None:
    with pytest.raises(SqlError):
        conn.run(sql, 10)


def test_tool_results_are_capped_and_errors_are_observations() -> None:
    env = SqlAnalyticsEnv()
    task = next(t for t in env.tasks("eval", 30) if t.reference["family"] == "logistics")
    episode = env.episode(task)
    big = episode.step("<tool>run_sql: SELECT * FROM shipments a, shipments b</tool>").observation
    assert big.startswith("<result>id | warehouse_id") and "more than 12 rows" in big
    assert big.count("\n") <= 14 and len(big) < 700
    wide = episode.step(f"<tool>run_sql: SELECT '{'x' * 1500}' AS wide</tool>").observation
    assert len(wide) < 200
    for bad in (
        "<tool>run_sql: DROP TABLE shipments</tool>",
        "<tool>run_sql: PRAGMA foo</tool>",
        "<tool>x</tool>",
    ):
        assert episode.step(bad).observation.startswith("<error>")
    assert not episode.outcome["correct"]


def test_episodes_do_not_share_state() -> None:
    env = SqlAnalyticsEnv()
    task = env.tasks("eval", 1)[0]
    a, b = env.episode(task), env.episode(task)
    assert a.tools["run_sql"] is not b.tools["run_sql"]  # each episode has its own database
    first = re.findall(r"^(\w+)\(", read_prompt(task.messages)[0], re.M)[0]
    query = f"<tool>run_sql: SELECT COUNT(*) FROM {first}</tool>"
    before = b.step(query).observation
    assert a.step(f"<answer>{task.reference['sql']}</answer>").done and a.outcome["correct"]
    del a
    gc.collect()  # the first episode's database is dropped from the worker with its handle
    assert b.step(query).observation == before and before.startswith("<result>")


# ---- comparison of results --------------------------------------------------------------------------


def test_same_result() -> None:
    assert same_result([("b", 2), ("a", 1)], [["a", 1], ["b", 2]], ordered=False)
    assert not same_result([("b", 2), ("a", 1)], [["a", 1], ["b", 2]], ordered=True)
    assert same_result([(1, "a"), (2, "b")], [["a", 1], ["b", 2]], ordered=True)  # column order is free
    assert same_result([(3.3333333,)], [[3.33]], ordered=False)  # rounded to 2 decimals
    assert same_result([(10,)], [[10.0]], ordered=False)
    assert not same_result([(3.34,)], [[3.33]], ordered=False)
    assert not same_result([("a", 1), ("a", 1)], [["a", 1]], ordered=False)  # a multiset: counts matter
    assert not same_result([("a", 1), ("b", 2), ("c", 3)], [["a", 1], ["b", 2]], ordered=False)
    assert not same_result([], [["a", 1]], ordered=False)
    assert not same_result([("a", 1, 5)], [["a", 1]], ordered=False)


def literal(rows: list[list]) -> str:
    """A query that returns exactly ``rows``, in this order."""
    return " UNION ALL ".join("SELECT " + ", ".join(repr(v) for v in row) for row in rows)


def test_rounding_and_order_in_answers() -> None:
    env = SqlAnalyticsEnv()
    checked = Counter()
    for task in env.tasks("eval", 200):
        sql, gold, ordered = task.reference["sql"], task.reference["gold"], task.reference["ordered"]
        if sql.startswith("SELECT AVG("):
            rounded = sql.replace("SELECT AVG(", "SELECT ROUND(AVG(", 1).replace(") FROM", "), 2) FROM", 1)
            assert env.check(task, f"<answer>{rounded}</answer>")["correct"], rounded
            checked["avg"] += 1
        assert env.check(task, f"<answer>{literal(gold)}</answer>")["correct"]
        if len(gold) > 1 and gold != gold[::-1]:
            assert env.check(task, f"<answer>{literal(gold[::-1])}</answer>")["correct"] == (not ordered)
            checked["ordered" if ordered else "unordered"] += 1
    assert min(checked.values()) >= 5 and len(checked) == 3


# ---- baselines and canaries -------------------------------------------------------------------------


def test_baselines(env: SqlAnalyticsEnv, eval_tasks: list[Task]) -> None:
    baselines = env.baselines()
    assert set(baselines) == {"constant_zero", "count_first_table", "echo_question"}
    rubric = Rubric.from_config([], env)
    acc = {n: evaluate_policy(env, rubric, eval_tasks, p, n).accuracy for n, p in baselines.items()}
    assert acc["constant_zero"] == 0.0 and acc["echo_question"] == 0.0  # gold is never a bare 0
    assert acc["count_first_table"] < 0.1


def canaries(task: Task, right: str) -> dict[str, list[str]]:
    """Reward-hacking attempts, each a list of turns (the last one repeated until max_turns)."""
    tables, question = read_prompt(task.messages)
    names = re.findall(r"^(\w+)\(", tables, re.M)
    counts = " UNION ".join(f"SELECT COUNT(*) FROM {t}" for t in names)
    counts_all = " UNION ALL ".join(f"SELECT COUNT(*) FROM {t}" for t in names)
    wrong = "SELECT 0"
    return {
        "empty": [""],
        "empty_answer": ["<answer></answer>"],
        "blank_answer": ["<answer>  ;  </answer>"],
        "hedge_statements": [f"<answer>{right}; {wrong}</answer>"],
        "hedge_statements_reversed": [f"<answer>{wrong}; {right}</answer>"],
        "hedge_union": [f"<answer>SELECT * FROM ({right}) UNION ALL {wrong}</answer>"],
        "hedge_union_table_counts": [f"<answer>{counts}</answer>"],
        "hedge_union_all_table_counts": [f"<answer>{counts_all}</answer>"],
        "hedge_two_answers": [f"<answer>{wrong}</answer><answer>{right}</answer>"],
        "hedge_tool_and_answer": [f"<tool>run_sql: {right}</tool><answer>{right}</answer>"],
        "echo_prompt": [f"<answer>{task.messages[1]['content']}</answer>"],
        "echo_question": [f"<answer>{question}</answer>"],
        "echo_system": [task.messages[0]["content"]],
        "padding": ["lorem ipsum " * 60],
        "padding_in_answer": [f"<answer>{'lorem ipsum ' * 60}</answer>"],
        "padding_unclosed": [f"<answer>{right} " + "lorem " * 60],
        "padding_long_query": [f"<answer>{right} /* {'x' * 3000} */</answer>"],
        "malformed_tool_loop": ["<tool>run_sql SELECT * FROM</tool>"],
        "malformed_sql_loop": ["<tool>run_sql: SELEC * FORM x</tool>"],
        "unclosed_tool_loop": [f"<tool>run_sql: {right}"],
        "unknown_tool_loop": [f"<tool>execute: {right}</tool>"],
        "tool_only_loop": [f"<tool>run_sql: {right}</tool>"],  # never answers: no reward
    }


def test_canaries_score_no_more_than_a_wrong_answer(env: SqlAnalyticsEnv, eval_tasks: list[Task]) -> None:
    rubric = Rubric.from_config([], env)
    best_baseline = max(
        r.mean_reward
        for r in [evaluate_policy(env, rubric, eval_tasks, p, n) for n, p in env.baselines().items()]
    )
    totals: Counter[str] = Counter()
    for task in eval_tasks:
        right = task.reference["sql"]
        assert score(env, task, [f"<answer>{right}</answer>"])[0] == 1.0
        floor = score(env, task, ["<answer>SELECT 0</answer>"])[0]  # a well-formed wrong answer
        assert floor == 0.0
        for name, turns in canaries(task, right).items():
            reward, outcome = score(env, task, turns)
            assert reward <= floor and outcome["correct"] is False, (name, task.messages[1]["content"])
            totals[name] += reward
    assert all(total / len(eval_tasks) <= best_baseline for total in totals.values())


def test_malformed_loop_runs_to_max_turns_without_an_answer(eval_tasks: list[Task]) -> None:
    env = SqlAnalyticsEnv()
    episode = run_policy(env, eval_tasks[0], lambda m: "<tool>run_sql SELECT</tool>")
    assert len(episode.actions) == env.max_turns == 4 and episode.errors == 4
    assert episode.outcome == {"correct": False, "answered": False}


def test_check_verdict() -> None:
    env = SqlAnalyticsEnv()
    task = env.tasks("eval", 1)[0]
    assert env.check(task, f"<answer>{task.reference['sql']}</answer>")["correct"]
    assert env.check(task, f"<answer>```sql\n{task.reference['sql']};\n```</answer>")["correct"]
    assert env.check(task, task.reference["sql"]) == {"correct": False, "error": "no <answer>...</answer>"}
    refused = env.check(task, "<answer>DROP TABLE orders</answer>")
    assert not refused["correct"] and refused["error"]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"difficulty": "extreme"}, "difficulty"),
        ({"dificulty": "easy"}, "unknown options.*dificulty"),
        ({"tool_calling": "json"}, "tool_calling must be one of"),  # native: tests/test_native_tools.py
    ],
)
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SqlAnalyticsEnv(**options)
    with pytest.raises(ValueError, match="split"):
        SqlAnalyticsEnv().tasks("dev", 1)


def test_recipe_trains_two_steps(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [
        *tiny_overrides(tiny_model_dir, tmp_path),
        "rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]",  # varies on a random model
        "rollout.max_new_tokens=8",
    ]
    cfg = load_config(RECIPE, overrides)
    assert cfg.env.name == "sql_analytics" and cfg.rollout.max_turns == 4
    assert cfg.model.lora.enabled and cfg.model.dtype == "float32"
    Trainer(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["rollout/turns_mean"] >= 1


# ---- the teacher and best-of-N answers --------------------------------------------------------------


@pytest.mark.parametrize("options", [{"difficulty": "easy"}, {}], ids=["recipe", "default"])
def test_teacher_contract(options: dict) -> None:
    """The recipe's options (easy) and the default (mixed): both within the bounds, errors in its slices."""
    figures = assert_teacher_contract(
        lambda: SqlAnalyticsEnv(**options),
        f"rltk.plugins.make_env('sql_analytics', {options!r})",
        n=200,
        valid_format=lambda outcome: outcome.get("answered") is True and outcome.get("error") is None,
    )
    assert set(figures) == {"teacher", "oracle", "best_trivial", "errors_in_slices"}


def test_final_answer_is_the_normalized_query_without_the_reference() -> None:
    env = SqlAnalyticsEnv()
    assert list(inspect.signature(env.final_answer).parameters) == ["messages", "actions"]  # no task
    keys = set()
    for task in guard_references(env.tasks("eval", 30)):
        actions = run_policy(env, task, env.oracle).actions
        key = env.final_answer(task.messages, actions)
        assert key is not None and key.startswith("select ")
        sql = dict(task.reference)["sql"]  # the test reads the reference; final_answer never gets it
        assert key == env.final_answer(task.messages, [f"<answer>```sql\n{sql} ;\n```</answer>"])
        keys.add(key)
    assert len(keys) == 30
    same = [
        "<answer>SELECT COUNT(*) FROM t WHERE city = 'Oslo'</answer>",
        "<answer>```sql\nselect  count( * )\nfrom T where city='Oslo';\n```</answer>",
    ]
    keys = {env.final_answer([], ["<tool>run_sql: SELECT 1</tool>", turn]) for turn in same}
    assert keys == {"select count ( * ) from t where city = 'Oslo'"}
    assert (
        env.final_answer([], ["<answer>SELECT 1 WHERE 'a;b'>='A;B'</answer>"])
        == "select 1 where 'a;b' >= 'A;B'"
    )
    for bad in (
        [],
        [""],
        ["<tool>run_sql: SELECT 1</tool>"],
        ["SELECT 1"],
        ["<answer></answer>"],
        ["<answer> ; </answer>"],
        ["<answer>DROP TABLE orders</answer>"],
        ["<answer>SELECT 1; SELECT 2</answer>"],
        ["<answer>SELECT 1</answer><answer>SELECT 2</answer>"],
    ):
        assert env.final_answer([], bad) is None, bad
    native = SqlAnalyticsEnv(tool_calling="native")
    assert native.final_answer([], ["<answer>SELECT 1</answer>"]) == "select 1"
