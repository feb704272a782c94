"""The ``dataset`` env: a labelled file trains with no Python, splits never move, bad rows named, checks."""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_overrides
from rltk_envs.dataset import DatasetEnv
from rltk_envs.dataset_checks import parse_number

from rltk.cli import main
from rltk.env import SPLITS, run_policy
from rltk.plugins import PluginError, get_env, make_env, register_reward

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "dataset_grpo.yaml")
DEPTS = ("account", "billing", "shipping", "technical")
ROUTING = {
    "prompt_template": "Subject: {subject}\n\n{message}",
    "system": "Route the ticket. Answer with the department name only.",
    "reference_column": "department",
    "check": "choice",
}


def ticket_rows(n: int, start: int = 0) -> list[dict[str, str]]:
    """``n`` distinct synthetic tickets (ids ``T<start+1>``...), their department skewed towards billing."""
    rows = []
    for i in range(start, start + n):
        rng = random.Random(i)
        dept = rng.choices(DEPTS, weights=(1, 4, 2, 2))[0]
        rows.append(
            {
                "id": f"T{i + 1:05d}",
                "subject": f"{dept.title()} issue {rng.randint(1, 99)}",
                "message": f"Ticket {i}: something about {dept} ({rng.random():.6f}).",
                "department": dept,
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def split_by_row(env: DatasetEnv) -> dict[int, str]:
    """1-based data row → its split."""
    return {r.row: r.split for r in env.records}


def oracle_accuracy(env: DatasetEnv, split: str, n: int = 400) -> float:
    tasks = env.tasks(split, n)
    return sum(bool(run_policy(env, t, env.oracle).outcome["correct"]) for t in tasks) / len(tasks)


@pytest.fixture(scope="module")
def tickets_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("data") / "tickets.csv", ticket_rows(2000))


# --- acceptance -----------------------------------------------------------------------------------------


def test_a_csv_of_2000_rows_trains_two_steps_with_no_python(
    tiny_model_dir: str, tickets_csv: Path, tmp_path: Path
) -> None:
    """``rltk train recipes/dataset_grpo.yaml env.options.path=...``: a warm start, then 2 RL steps."""
    overrides = [
        *tiny_overrides(tiny_model_dir, tmp_path / "run", steps=2),
        f"env.options.path={tickets_csv}",
        "warmstart.enabled=true",
        "warmstart.steps=1",
        "warmstart.batch_size=2",
    ]
    assert main(["train", RECIPE, *overrides]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "manifest.json").is_file()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("step") == 2 for m in steps)


def test_eval_prints_the_trivial_baselines(tickets_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = json.dumps({"path": str(tickets_csv), **ROUTING})
    args = ["eval", "--policy", "oracle", "--env", "dataset", "--env-options", options, "--n", "100"]
    assert main(args) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert table["oracle"][2] == "100.0%"
    for name in ("most_frequent", *(f"constant_{d}" for d in DEPTS)):
        assert name in table, out
    env = make_env("dataset", {"path": str(tickets_csv), **ROUTING})
    assert env.baselines()["most_frequent"]([]) == "billing"  # the train split's most frequent label
    assert float(table["most_frequent"][2].rstrip("%")) == float(table["constant_billing"][2].rstrip("%"))
    assert float(table["most_frequent"][2].rstrip("%")) < 100.0


def test_malformed_rows_are_reported_by_number_and_never_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = ticket_rows(40)
    rows[2]["message"] = ""  # row 3: a prompt column without a value
    rows[6]["department"] = ""  # row 7: no reference
    rows[9]["department"] = "legal"  # row 10: not one of the labels
    rows[19]["message"] = "line one\nline two"  # a field over two lines: later rows' file lines shift
    rows[24]["department"] = "??"  # row 25: not a label either; it starts on file line 27
    path = write_csv(tmp_path / "bad.csv", rows)
    options = {"path": str(path), **ROUTING, "labels": list(DEPTS)}
    with caplog.at_level(logging.WARNING, logger="rltk"):
        env = DatasetEnv(**options)
    message = "\n".join(r.getMessage() for r in caplog.records)
    assert "4 of 40 rows left out" in message
    assert "missing value in column 'message': row 3 (line 4)" in message
    assert "missing reference (column 'department'): row 7 (line 8)" in message
    assert "row 10 (line 11)" in message and "row 25 (line 27)" in message and "'legal'" in message
    assert sorted(b.row for b in env.bad_rows) == [3, 7, 10, 25]
    used = {t.reference["row"] for s in SPLITS for t in env.tasks(s, 100) if env.by_split[s]}
    assert used.isdisjoint({3, 7, 10, 25}) and len({r.row for r in env.records}) == 36
    with pytest.raises(ValueError, match=r"row 3 \(line 4\)[\s\S]*on_bad_rows=skip"):
        DatasetEnv(**options, on_bad_rows="error")


def test_jsonl_rows_are_numbered_by_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [json.dumps({"q": f"{i} + 1", "a": i + 1}) for i in range(20)]
    lines[4] = json.dumps({"q": "five", "a": "five"})  # row 5: not a number
    lines[8] = json.dumps({"q": None, "a": 3})  # row 9: no prompt
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="rltk"):
        env = DatasetEnv(
            path=str(tmp_path / "d.jsonl"), prompt_column="q", reference_column="a", check="numeric"
        )
    assert sorted(b.row for b in env.bad_rows) == [5, 9]
    assert "reference 'five' is not a number: row 5" in caplog.text
    assert "empty prompt (column 'q'): row 9" in caplog.text


def test_missing_columns_and_all_bad_rows_raise_naming_the_columns(tickets_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"no column for reference_column 'label'.*\['id', 'subject', 'message'"
    ):
        DatasetEnv(path=str(tickets_csv), prompt_column="message", reference_column="label")
    with pytest.raises(ValueError, match=r"prompt_template 'body'"):
        DatasetEnv(path=str(tickets_csv), prompt_template="{body}", reference_column="department")
    with pytest.raises(ValueError, match=r"40 of 40 rows left out[\s\S]*no usable row is left"):
        DatasetEnv(
            path=str(write_csv(tmp_path / "t.csv", ticket_rows(40))),
            prompt_column="message",
            reference_column="department",
            check="numeric",
        )


@pytest.mark.parametrize("by", ["id_column", "input columns"])
def test_appending_rows_or_editing_the_template_moves_no_row(tmp_path: Path, by: str) -> None:
    rows = ticket_rows(2000)
    options = {**ROUTING, "id_column": "id"} if by == "id_column" else dict(ROUTING)
    before = split_by_row(DatasetEnv(path=str(write_csv(tmp_path / "a.csv", rows)), **options))
    assert len(before) == 2000
    counts = {s: list(before.values()).count(s) for s in SPLITS}
    assert 1500 < counts["train"] < 1700 and 140 < counts["eval"] < 260 and 140 < counts["test"] < 260
    appended = DatasetEnv(path=str(write_csv(tmp_path / "b.csv", rows + ticket_rows(500, 2000))), **options)
    after = split_by_row(appended)
    assert len(after) == 2500 and {r: after[r] for r in before} == before
    edited = {**options, "prompt_template": "Ticket {id}\nTopic: {subject}\nBody: {message}", "system": None}
    moved = split_by_row(DatasetEnv(path=str(tmp_path / "a.csv"), **edited))
    assert moved == before
    shuffled = rows[::-1]  # row order does not decide either: the same row keeps its split wherever it sits
    reordered = DatasetEnv(path=str(write_csv(tmp_path / "c.csv", shuffled)), **options)
    assert {2001 - r: s for r, s in split_by_row(reordered).items()} == before


def test_tasks_are_deterministic_prefix_stable_and_disjoint(
    tickets_csv: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = DatasetEnv(path=str(tickets_csv), **ROUTING)
    a = env.tasks("eval", 50, seed=3)
    assert a == DatasetEnv(path=str(tickets_csv), **ROUTING).tasks("eval", 50, seed=3)
    assert env.tasks("eval", 20, seed=3) == a[:20]
    assert [t.id for t in env.tasks("eval", 50, seed=4)] != [t.id for t in a]
    ids = {s: {t.id for t in env.tasks(s, 5000)} for s in SPLITS}
    assert sum(map(len, ids.values())) == 2000  # every row once, in one split
    assert not (ids["train"] & ids["eval"] or ids["train"] & ids["test"] or ids["eval"] & ids["test"])
    with caplog.at_level(logging.WARNING, logger="rltk"):
        assert len(env.tasks("eval", 5000)) == len(env.by_split["eval"])  # eval never repeats a row
    assert "returning those" in caplog.text
    train = env.tasks("train", 2 * len(env.by_split["train"]) + 3)  # train repeats in epochs
    assert len(train) == 2 * len(env.by_split["train"]) + 3 and len({t.id for t in train}) == len(
        env.by_split["train"]
    )
    assert all(t.split == s for s in SPLITS for t in env.tasks(s, 30))


# --- check kinds ----------------------------------------------------------------------------------------


def build(tmp_path: Path, rows: list[dict[str, Any]], **options: Any) -> DatasetEnv:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DatasetEnv(path=str(path), split_ratios=[1, 1, 1], **options)


def any_task(env: DatasetEnv, reference: Any) -> Any:
    """A task (any split) whose reference cell reads ``reference``."""
    return next(t for s in SPLITS for t in env.tasks(s, 1000) if t.reference["reference"] == reference)


def test_exact_check_normalises(tmp_path: Path) -> None:
    rows = [{"q": f"capital {i}", "a": name} for i, name in enumerate(["New York", "Paris", "São Paulo"] * 5)]
    env = build(tmp_path, rows, prompt_column="q", reference_column="a")
    task = any_task(env, "New York")
    for good in ("New York", "  new  york. ", '"NEW YORK"'):
        assert env.check(task, good)["correct"], good
    for bad in ("New York City", "York", "", "New York or Paris"):
        assert not env.check(task, bad)["correct"], bad
    strict = build(tmp_path, rows, prompt_column="q", reference_column="a", case_sensitive=True)
    assert not strict.check(any_task(strict, "New York"), "new york")["correct"]
    assert all(oracle_accuracy(env, s) == 1.0 for s in SPLITS)


def test_choice_check_and_label_set(tmp_path: Path) -> None:
    rows = [{"text": f"review {i}", "label": ["pos", "neg", "NEUTRAL"][i % 3]} for i in range(30)]
    env = build(tmp_path, rows, prompt_column="text", reference_column="label", check="choice")
    task = any_task(env, "pos")
    assert "Answer with one of: neg, NEUTRAL, pos." in task.messages[0]["content"]
    assert env.check(task, "Pos.") == {"correct": True, "answer": "pos", "score": 1.0}
    assert env.check(task, "positive")["answer"] is None and not env.check(task, "pos neg")["correct"]
    assert env.check(any_task(env, "NEUTRAL"), "neutral")["answer"] == "NEUTRAL"
    assert set(env.baselines()) == {"most_frequent", "constant_pos", "constant_neg", "constant_NEUTRAL"}
    assert all(oracle_accuracy(env, s) == 1.0 for s in SPLITS)
    many = [{"text": f"t{i}", "label": f"L{i % 12}"} for i in range(60)]
    assert set(
        build(tmp_path, many, prompt_column="text", reference_column="label", check="choice").baselines()
    ) == {"most_frequent"}  # 12 labels: no constant per label


def test_numeric_check_with_tolerance(tmp_path: Path) -> None:
    rows = [{"q": f"q{i}", "a": v} for i, v in enumerate(["1,234.5", "$12", "0.1", "40%", "3"] * 3)]
    env = build(tmp_path, rows, prompt_column="q", reference_column="a", check="numeric", tolerance=0.01)
    t = any_task(env, "1,234.5")
    assert env.check(t, "1234.5")["correct"] and env.check(t, "1,234.505")["correct"]
    assert not env.check(t, "1234.6")["correct"] and not env.check(t, "1234.5 or 1234.6")["correct"]
    assert env.check(t, "$1,234.50.")["answer"] == "1234.5"
    rel = build(tmp_path, rows, prompt_column="q", reference_column="a", check="numeric", rel_tolerance=0.1)
    assert (
        rel.check(any_task(rel, "40%"), "43")["correct"]
        and not rel.check(any_task(rel, "40%"), "45")["correct"]
    )
    assert "median" in env.baselines() and all(oracle_accuracy(env, s) == 1.0 for s in SPLITS)
    assert parse_number("inf") is None and parse_number("1/0") is None


def test_json_fields_with_f1(tmp_path: Path) -> None:
    gold = {"vendor": "ACME Corp", "total": 12.5, "currency": "USD"}
    rows = [{"doc": f"invoice {i}", "fields": json.dumps({**gold, "total": 12.5 + i})} for i in range(12)]
    env = build(
        tmp_path, rows, prompt_column="doc", reference_column="fields", check="json_f1", f1_threshold=0.6
    )
    assert env.default_rewards == {"rltk_envs.dataset_checks:dataset_score": 1.0}
    t = next(t for s in SPLITS for t in env.tasks(s, 100) if t.reference["value"]["total"] == 12.5)
    two = env.check(t, '```json\n{"vendor": "acme corp", "total": "$12.50", "currency": "EUR"}\n```')
    assert two["score"] == pytest.approx(2 / 3) and two["correct"]
    one = env.check(t, '{"vendor": "ACME Corp", "total": 13, "currency": "EUR"}')
    assert one["score"] == pytest.approx(1 / 3) and not one["correct"]
    for hedge in (
        '{"total": 12.5, "total": 13}',
        '{"total": 12.5} {"total": 13}',
        "12.5",
        "",
        None,
        "{" * 10_000,
    ):
        assert env.check(t, hedge) == {"correct": False, "answer": None, "score": 0.0}
    assert all(oracle_accuracy(env, s) == 1.0 for s in SPLITS)
    assert json.loads(env.baselines()["most_frequent_fields"]([]))["vendor"] == "ACME Corp"
    only = build(
        tmp_path,
        rows,
        prompt_column="doc",
        reference_column="fields",
        check="json_f1",
        json_fields=["vendor"],
    )
    assert only.check(only.tasks("train", 1)[0], '{"vendor": "Acme corp", "extra": 1}')["correct"]


def test_regex_check_needs_and_checks_demonstrations(tmp_path: Path) -> None:
    rows = [
        {"q": f"date {i}", "pattern": rf"2024-0?3-0?{i % 9 + 1}", "demo": f"2024-03-0{i % 9 + 1}"}
        for i in range(18)
    ]
    rows[3]["demo"] = "March 4"  # row 4: its demonstration fails its own pattern
    rows[5]["pattern"] = "2024-(03"  # row 6: not a regular expression
    with pytest.raises(ValueError, match="check: regex needs demo_column"):
        build(tmp_path, rows, prompt_column="q", reference_column="pattern", check="regex")
    env = build(
        tmp_path, rows, prompt_column="q", reference_column="pattern", check="regex", demo_column="demo"
    )
    assert sorted(b.row for b in env.bad_rows) == [4, 6]
    t = next(t for s in SPLITS for t in env.tasks(s, 100) if t.reference["reference"] == r"2024-0?3-0?1")
    assert env.check(t, " 2024-3-1 ")["correct"] and not env.check(t, "2024-03-01 or 2024-03-02")["correct"]
    assert not env.check(t, "2" * 10_000)["correct"]
    assert all(oracle_accuracy(env, s) == 1.0 for s in SPLITS)


@register_reward("dataset_test_contains")
def contains(completion: str, reference: dict, outcome: dict, bonus: float = 0.0) -> float:
    """1 (+ bonus) when the completion contains the reference answer; raises on ``boom``."""
    if completion == "boom":
        raise RuntimeError("boom")
    return (1.0 + bonus) if reference["answer"].lower() in completion.lower() else 0.0


def test_named_reward_check(tmp_path: Path) -> None:
    rows = [{"q": f"q{i}", "a": f"answer {i % 4}"} for i in range(16)]
    params = {"reward_params": {"bonus": 0.5}, "reward_threshold": 1.5}
    env = build(tmp_path, rows, prompt_column="q", reference_column="a", check="reward",
                reward="dataset_test_contains", **params)  # fmt: skip
    assert env.default_rewards == {"dataset_test_contains": 1.0}
    assert env.default_reward_params == {"dataset_test_contains": {"bonus": 0.5}}
    t = env.tasks("train", 1)[0]
    assert env.check(t, f"It is {t.reference['answer']}!") == {
        "correct": True, "answer": f"it is {t.reference['answer']}!", "score": 1.5,
    }  # fmt: skip
    assert env.check(t, "no idea")["correct"] is False
    assert env.check(t, "boom") == {
        "correct": False,
        "answer": "boom",
        "score": None,
    }  # a reward bug: not correct
    assert all(oracle_accuracy(env, s) == 1.0 for s in SPLITS)
    with pytest.raises(ValueError, match="reward='no_such_reward'"):
        build(
            tmp_path, rows, prompt_column="q", reference_column="a", check="reward", reward="no_such_reward"
        )


# --- loading --------------------------------------------------------------------------------------------


def test_jsonl_parquet_and_saved_datasets_give_the_csv_records(tmp_path: Path, tickets_csv: Path) -> None:
    import datasets

    rows = ticket_rows(300)
    csv_env = DatasetEnv(path=str(write_csv(tmp_path / "t.csv", rows)), **ROUTING)
    ds = datasets.Dataset.from_list(rows)
    ds.to_json(str(tmp_path / "t.jsonl"))
    ds.to_parquet(str(tmp_path / "t.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "other": ds.select(range(10))}).save_to_disk(str(tmp_path / "dict"))
    envs = [
        DatasetEnv(path=str(tmp_path / "t.jsonl"), **ROUTING),
        DatasetEnv(path=str(tmp_path / "t.parquet"), **ROUTING),
        DatasetEnv(path=str(tmp_path / "saved"), **ROUTING),
        DatasetEnv(path=str(tmp_path / "dict"), source_split="train", **ROUTING),
    ]
    for env in envs:
        assert env.records == csv_env.records
    with pytest.raises(ValueError, match=r"splits \['train', 'other'\]; set env.options.source_split"):
        DatasetEnv(path=str(tmp_path / "dict"), **ROUTING)


def test_loading_writes_no_cache_to_the_home_directory(tmp_path: Path) -> None:
    import datasets

    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = sorted(cache.rglob("*")) if cache.exists() else []
    DatasetEnv(path=str(write_csv(tmp_path / "fresh.csv", ticket_rows(50))), **ROUTING)
    after = sorted(cache.rglob("*")) if cache.exists() else []
    assert after == before


def test_csv_cells_stay_text(tmp_path: Path) -> None:
    rows = [{"id": "007", "q": "NA", "a": "0012"}, {"id": "8", "q": "null", "a": "12"}]
    path = write_csv(tmp_path / "c.csv", rows)
    env = DatasetEnv(path=str(path), prompt_column="q", reference_column="a", split_ratios=[1, 0, 0])
    assert {t.messages[-1]["content"] for t in env.tasks("train", 2)} == {"NA", "null"}  # not missing values
    assert {r.reference for r in env.records} == {"0012", "12"}  # not numbers


# --- options, oracle, canaries --------------------------------------------------------------------------


def test_every_option_problem_is_listed_at_once(tickets_csv: Path) -> None:
    with pytest.raises(ValueError) as err:
        DatasetEnv(
            path=str(tickets_csv), reference_column="", check="fuzzy", split_ratios=[1, 2], tolerance=-1
        )
    text = str(err.value)
    for part in (
        "reference_column=''",
        "give exactly one",
        "check='fuzzy'",
        "split_ratios=[1, 2]",
        "tolerance=-1",
    ):
        assert part in text, text
    with pytest.raises(PluginError, match=r"unknown options.*valid: path, format"):
        make_env("dataset", {"path": str(tickets_csv), "promt_column": "message"})
    with pytest.raises(ValueError, match=r"prompt_template='\{0\} \{a\.b\}'.*plain column names"):
        DatasetEnv(path=str(tickets_csv), prompt_template="{0} {a.b}", reference_column="department")


def test_registered_and_oracle_reads_only_the_prompt(tickets_csv: Path) -> None:
    assert get_env("dataset") is DatasetEnv
    env = DatasetEnv(path=str(tickets_csv), **ROUTING)
    assert env.teacher() is None and env.max_new_tokens >= 8
    for task in env.tasks("test", 50):
        assert env.oracle([dict(m) for m in task.messages]) == task.reference["answer"]
    assert env.oracle([{"role": "user", "content": "a prompt not in the file"}]) == ""


def test_canaries_score_nothing(tickets_csv: Path) -> None:
    env = DatasetEnv(path=str(tickets_csv), **ROUTING)
    task = env.tasks("eval", 1)[0]
    answer = task.reference["answer"]
    for junk in (
        "",
        " ",
        " ".join(DEPTS),
        answer + " " * 5000 + answer,
        f"{answer} or billing",
        None,
        42,
        "\x00",
    ):
        verdict = env.check(task, junk)  # type: ignore[arg-type]
        assert verdict["correct"] is False, junk
    assert env.final_answer(task.messages, [f" {answer.upper()}. "]) == answer
    assert env.final_answer(task.messages, ["what?"]) is None
