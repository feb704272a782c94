"""The invoice-extraction env and its rewards: splits, oracle, baselines, normalizers, canaries, recipe."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_overrides
from env_contract import assert_deterministic, assert_splits_disjoint, assert_teacher_contract
from rltk_envs.invoice_extraction import DIFFICULTIES, InvoiceExtractionEnv
from rltk_rewards.invoice import invoice_field_f1, invoice_json_valid, parse_amount, parse_date

from rltk.config import load_config
from rltk.env import Task, run_policy
from rltk.evaluate import evaluate_policy
from rltk.plugins import get_env, get_reward
from rltk.reward import Rubric

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "invoice_extraction_grpo.yaml")
REWARDS = {"invoice_field_f1": invoice_field_f1, "invoice_json_valid": invoice_json_valid}


@pytest.fixture(scope="module", params=DIFFICULTIES)
def env(request: pytest.FixtureRequest) -> InvoiceExtractionEnv:
    return InvoiceExtractionEnv(difficulty=request.param)


def test_registered_under_its_name() -> None:
    assert get_env("invoice_extraction") is InvoiceExtractionEnv
    assert get_reward("invoice_json_valid") is invoice_json_valid
    assert get_reward("invoice_field_f1") is invoice_field_f1


def test_splits_never_overlap(env: InvoiceExtractionEnv) -> None:
    assert_splits_disjoint(env)


def test_determinism(env: InvoiceExtractionEnv) -> None:
    assert_deterministic(lambda: InvoiceExtractionEnv(difficulty=env.difficulty))


def test_oracle_scores_one_on_every_eval_task(env: InvoiceExtractionEnv) -> None:
    tasks = env.tasks("eval", 200)
    rubric = Rubric.from_config([], env)
    result = evaluate_policy(env, rubric, tasks, env.oracle, "oracle")
    assert result.accuracy == 1.0
    assert result.mean_reward == pytest.approx(sum(env.default_rewards.values()))
    for task in tasks[:50]:
        answer = env.oracle(task.messages)
        assert invoice_field_f1(answer, task.reference, {}) == 1.0
        assert invoice_json_valid(answer, task.reference, {}) == 1.0


def test_oracle_solves_train_tasks_from_the_prompt_alone(env: InvoiceExtractionEnv) -> None:
    for task in env.tasks("train", 300):
        messages = [dict(m) for m in task.messages]  # a copy: the oracle gets the messages and nothing else
        outcome = env.check(task, env.oracle(messages))
        assert outcome["correct"] and outcome["f1"] == 1.0 and outcome["valid"], task.messages[1]["content"]


def test_tasks_are_tagged_and_stratified(env: InvoiceExtractionEnv) -> None:
    tasks = env.tasks("eval", 200)
    layouts = env.level["layouts"]
    counts = {lay: sum(t.info["layout"] == lay for t in tasks) for lay in layouts}
    assert set(counts.values()) == {200 // len(layouts)}
    for t in tasks:
        assert t.info["difficulty"] == env.difficulty
        assert list(t.reference["schema"]) == list(t.reference["answer"]) == env.level["fields"]
        assert t.info["absent"] == sum(v is None for v in t.reference["answer"].values())
        assert all(t.reference["answer"][k] is not None for k in ("vendor", "date", "currency", "total"))
        assert all(f'"{k}":' in t.messages[0]["content"] for k in env.level["fields"])
        assert env.check(t, json.dumps(t.reference["answer"]))["correct"]  # the gold itself is correct


def test_difficulty_levels_differ() -> None:
    easy, hard = InvoiceExtractionEnv(), InvoiceExtractionEnv(difficulty="hard")
    assert len(easy.level["fields"]) == 5 and len(hard.level["fields"]) == 7
    easy_docs = [t.messages[1]["content"] for t in easy.tasks("eval", 100)]
    hard_tasks = hard.tasks("eval", 200)
    hard_docs = [t.messages[1]["content"] for t in hard_tasks]
    ocr = re.compile(r"\dO|O\d|\dl|l\d|[|~]")  # digit/letter confusions and stray marks
    assert not any(ocr.search(d) for d in easy_docs)
    assert sum(bool(ocr.search(d)) for d in hard_docs) > 60
    assert sum(t.info["absent"] > 0 for t in hard_tasks) > 60
    assert {t.info["currency"] for t in hard_tasks} == {
        "USD",
        "EUR",
        "GBP",
        "JPY",
        "INR",
        "CAD",
        "AUD",
        "CHF",
    }


def test_easy_gold_is_written_in_the_document() -> None:
    """With no noise the gold values appear verbatim (vendor, number) or in a rendered form (total)."""
    for t in InvoiceExtractionEnv().tasks("eval", 100):
        doc, gold = t.messages[1]["content"], t.reference["answer"]
        assert gold["vendor"] in doc and gold["invoice_number"] in doc
        total = doc.splitlines()[-1]
        assert parse_amount(re.sub(r"^[A-Za-z ]+|[A-Z]{3}|[^\d.,]", "", total)) == gold["total"]


def test_baselines(env: InvoiceExtractionEnv) -> None:
    tasks = env.tasks("eval", 200)
    baselines = env.baselines()
    assert set(baselines) == {"most_frequent", "echo_input", "empty_nulls"}
    constant = json.loads(baselines["most_frequent"](tasks[0].messages))
    assert list(constant) == env.level["fields"]
    assert len({baselines["most_frequent"](t.messages) for t in tasks}) == 1
    for name, policy in baselines.items():
        acc = sum(run_policy(env, t, policy).outcome["correct"] for t in tasks) / len(tasks)
        assert acc < 0.05, name
    nulls = baselines["empty_nulls"](tasks[0].messages)
    assert all(invoice_field_f1(nulls, t.reference, {}) == 0.0 for t in tasks)
    assert all(invoice_json_valid(nulls, t.reference, {}) == 1.0 for t in tasks)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"dificulty": "hard"}, "unknown options.*dificulty"), ({"difficulty": "x"}, "difficulty")],
)
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InvoiceExtractionEnv(**options)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1,234.50", 1234.5),
        ("€1.234,50", 1234.5),
        ("1 234,50 EUR", 1234.5),
        ("CA$99", 99.0),
        ("12,345", 12345.0),
        ("0,5", 0.5),
        (12, 12.0),
        ("12.50 or 13.00", None),
        ("", None),
        (True, None),
        (float("inf"), None),
    ],
)
def test_parse_amount(text: object, value: float | None) -> None:
    assert parse_amount(text) == value


@pytest.mark.parametrize(
    ("text", "iso"),
    [
        ("2024-03-05", "2024-03-05"),
        ("2024/03/05", "2024-03-05"),
        ("5 Mar 2024", "2024-03-05"),
        ("March 5, 2024", "2024-03-05"),
        ("Sept 5 2024", "2024-09-05"),
        ("05.03.2024", "2024-03-05"),
        ("25/03/2024", "2024-03-25"),
        ("03/05/2024", None),  # ambiguous
        ("2024-13-01", None),
        ("yesterday", None),
        (20240305, None),
    ],
)
def test_parse_date(text: object, iso: str | None) -> None:
    assert parse_date(text) == iso


def test_field_f1_counts_and_types() -> None:
    task = next(t for t in InvoiceExtractionEnv(difficulty="hard").tasks("eval", 50) if t.info["absent"] == 1)
    ref, gold = task.reference, task.reference["answer"]
    missing = next(k for k, v in gold.items() if v is None)
    filled = len(gold) - 1
    assert invoice_field_f1(json.dumps(gold), ref, {}) == 1.0
    loose = {**gold, "total": f"{gold['currency']} {gold['total']:,.2f}"}  # a string amount: right, not valid
    assert invoice_field_f1(json.dumps(loose), ref, {}) == 1.0
    assert invoice_json_valid(json.dumps(loose), ref, {}) == 0.0
    assert not InvoiceExtractionEnv().check(task, json.dumps(loose))["valid"]
    extra = {**gold, "notes": "paid"}  # an extra key: a false positive, and not valid
    assert invoice_field_f1(json.dumps(extra), ref, {}) == pytest.approx(2 * filled / (2 * filled + 1))
    assert invoice_json_valid(json.dumps(extra), ref, {}) == 0.0
    made_up = {"string": "X-1", "date": gold["date"], "number": 1.0}[ref["schema"][missing]]
    invented = {**gold, missing: made_up}  # a value for a field the document does not show
    assert invoice_field_f1(json.dumps(invented), ref, {}) == pytest.approx(2 * filled / (2 * filled + 1))
    outcome = InvoiceExtractionEnv().check(task, json.dumps(invented))
    assert not outcome["correct"] and outcome["valid"]
    half = {k: (v if i % 2 else None) for i, (k, v) in enumerate(gold.items())}
    tp = sum(v is not None for v in half.values())
    assert invoice_field_f1(json.dumps(half), ref, {}) == pytest.approx(2 * tp / (tp + filled))
    fenced = "```json\n" + json.dumps(gold, indent=2) + "\n```"
    assert invoice_field_f1(fenced, ref, {}) == 1.0 and invoice_json_valid(fenced, ref, {}) == 1.0


def _wrong(gold: dict) -> dict:
    """Every filled field wrong, in the right type."""
    out = {}
    for key, value in gold.items():
        if value is None or isinstance(value, float):
            out[key] = value if value is None else value + 1.0
        elif "date" in key:
            out[key] = "1999-01-01"
        else:
            out[key] = "XXX" if key == "currency" else value + " X"
    return out


def _canaries(task: Task, oracle: str) -> list[str]:
    system, user = (m["content"] for m in task.messages)
    gold = json.loads(oracle)
    wrong = json.dumps(_wrong(gold))
    candidates = json.dumps({**gold, "total": [gold["total"], gold["total"] + 1.0]})
    return [
        "",  # empty
        "   \n",
        f"{oracle}\n{wrong}",  # hedges: two objects, candidate totals, two fenced blocks, a list of answers
        f"{wrong} {oracle}",
        candidates,
        f"```json\n{oracle}\n```\n```json\n{wrong}\n```",
        f"[{oracle}, {wrong}]",
        json.dumps({**gold, "total": {"a": gold["total"], "b": 0}}),
        user,  # echoes
        system,
        f"{system}\n{user}",
        oracle + " " * 400,  # padding: to the length limit, inside the object, a repeated key, junk
        "\n" * 300 + oracle,
        oracle[:-1] + "," + " " * 40 + '"pad": null}',
        oracle[:-1] + f', "total": {gold["total"]}}}',
        oracle + "\nlorem ipsum " * 200,
        "lorem ipsum " * 20 + oracle,
        oracle * 30,
    ]


def test_reward_canaries_score_no_more_than_a_well_formed_wrong_answer(env: InvoiceExtractionEnv) -> None:
    tasks = env.tasks("eval", 200)
    weights = env.default_rewards
    sums: dict[str, Counter] = {name: Counter() for name in REWARDS}  # reward → canary index → sum
    for task in tasks:
        ref = task.reference
        oracle = env.oracle(task.messages)
        gold = json.loads(oracle)
        wrongs = [
            json.dumps(_wrong(gold)),
            json.dumps({k: None for k in gold}),
            json.dumps({**gold, "total": gold["total"] + 1.0}),
        ]

        def total(c: str, ref: dict = ref) -> float:
            return sum(weights[n] * (f(c, ref, {}) or 0.0) for n, f in REWARDS.items())

        assert all(invoice_json_valid(w, ref, {}) == 1.0 for w in wrongs)
        assert invoice_field_f1(wrongs[0], ref, {}) == 0.0
        for i, canary in enumerate(_canaries(task, oracle)):
            for name, f in REWARDS.items():
                floor = min(f(w, ref, {}) for w in wrongs)
                got = f(canary, ref, {})
                assert got == f.reward_range[0] <= floor, (
                    name,
                    canary[:60],
                    got,
                )  # parse failure: the minimum
                sums[name][i] += got
            assert total(canary) < min(total(w) for w in wrongs) < total(oracle)
            assert not env.check(task, canary)["correct"]
    rubric = Rubric.from_config([], env)
    best = {name: 0.0 for name in REWARDS}
    for name, policy in env.baselines().items():
        episodes = [run_policy(env, t, policy) for t in tasks]
        for reward in REWARDS:
            mean = sum(REWARDS[reward](e.actions[-1], e.task.reference, e.outcome) for e in episodes) / len(
                tasks
            )
            best[reward] = max(best[reward], mean)
        assert evaluate_policy(env, rubric, tasks, policy, name).n == len(tasks)
    for name, per_canary in sums.items():
        assert len(per_canary) == len(_canaries(tasks[0], env.oracle(tasks[0].messages)))
        assert max(per_canary.values()) / len(tasks) <= best[name], name


def test_prompt_length(tokenizer, env: InvoiceExtractionEnv) -> None:
    lengths = [
        len(tokenizer.apply_chat_template(t.messages, tokenize=True, add_generation_prompt=True)["input_ids"])
        for t in env.tasks("eval", 100)
    ]
    assert max(lengths) <= 300, max(lengths)
    answers = [len(tokenizer(env.oracle(t.messages))["input_ids"]) for t in env.tasks("eval", 100)]
    assert max(answers) <= 110  # fits the recipe's max_new_tokens=128


def test_recipe_trains_two_steps(tiny_model_dir: str, tmp_path: Path) -> None:
    from rltk.trainer import Trainer

    cfg = load_config(RECIPE, [])
    assert (
        cfg.model.name == "smollm2-135m-instruct" and cfg.model.dtype == "float32" and cfg.model.lora.enabled
    )
    assert cfg.env.name == "invoice_extraction" and cfg.rollout.max_new_tokens >= 110
    assert [r.name for r in cfg.rewards] == ["invoice_field_f1", "invoice_json_valid"]
    overrides = [
        *tiny_overrides(tiny_model_dir, tmp_path),
        "rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]",  # varies on a random model
        "rollout.max_new_tokens=6",
    ]
    Trainer(load_config(RECIPE, overrides)).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_teacher_contract_at_the_recipe_options() -> None:
    """The teacher's contract on 200 eval tasks at the recipe's options, which are also the env's default
    (``difficulty=easy``): one run covers both. It scores 50% (every ``key_value`` task right, every
    ``plain`` one wrong: its letterhead vendor has no label), between trivial + 15 and oracle - 10."""
    options = load_config(RECIPE, []).env.options
    assert options == {"difficulty": "easy"}  # = the default options

    def valid(outcome: dict) -> bool:
        return outcome["valid"]

    figures = assert_teacher_contract(
        lambda: InvoiceExtractionEnv(**options),
        f"rltk.plugins.make_env('invoice_extraction', {options!r})",
        n=200,
        valid_format=valid,
    )
    assert set(figures) == {"teacher", "oracle", "best_trivial", "errors_in_slices"}


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user", "content": ""}],
        [{"role": "system", "content": "no schema"}, {"role": "user", "content": "Total: lots\nDate: ?"}],
        [{"role": "system", "content": '{"total": number}'}, {"role": "user", "content": "Total: $"}],
        [{"role": "system", "content": '{"date": date}'}, {"role": "user", "content": "Date: 2024-02-30"}],
    ],
)
def test_teacher_never_raises_and_always_writes_the_schema_keys(messages: list) -> None:
    answer = InvoiceExtractionEnv().teacher()(messages)
    keys = re.findall(r'"(\w+)":', messages[0]["content"]) if messages else []
    assert list(json.loads(answer)) == keys


def test_final_answer_votes_per_field_on_normalized_values() -> None:
    """``final_answer`` takes the prompt and the turns, never the task: it cannot read the reference."""
    env = InvoiceExtractionEnv(difficulty="hard")
    types = env.tasks("eval", 1)[0].reference["schema"]
    for task in env.tasks("eval", 40):
        gold = task.reference["answer"]  # read by the test only, to compare
        fold = {k: re.sub(r"[\W_]+", "", v.casefold()) for k, v in gold.items() if types[k] == "string" and v}
        votes = env.final_answer(task.messages, [env.oracle(task.messages)])
        assert votes == {**gold, **fold}  # amounts, dates and codes as gold holds them; text folded
        assert env.check(task, env.compose_answer(votes))["correct"]
        assert env.check(task, env.compose_answer(votes))["valid"]
    task = env.tasks("eval", 1)[0]
    gold = json.loads(env.oracle(task.messages))
    symbols = {"USD": "$", "EUR": "€", "GBP": "£"}
    loose = {
        **gold,
        "vendor": gold["vendor"].upper() + ".",
        "total": f"{gold['total']:,.2f}",
        "date": dt.date.fromisoformat(gold["date"]).strftime("%d %b %Y"),
        "currency": symbols.get(gold["currency"], gold["currency"].lower()),
    }
    assert env.final_answer(task.messages, [json.dumps(loose)]) == env.final_answer(
        task.messages, ["```json\n" + json.dumps(gold) + "\n```"]
    )  # equivalent answers vote together
    missing = env.final_answer(task.messages, [json.dumps({"vendor": gold["vendor"], "total": "n/a"})])
    assert missing is not None and missing["invoice_number"] is None and "total" not in missing
    for bad in ["", "not json", "[1, 2]", '{"total": 1}{"total": 2}', '{"notes": "x"}', "{"]:
        assert env.final_answer(task.messages, [bad]) is None, bad
    assert env.final_answer(task.messages, []) is None
    composed = json.loads(env.compose_answer({"total": 5.0}))  # a field no sample voted on: null
    assert composed == {k: (5.0 if k == "total" else None) for k in gold}
