"""The support_refund env and its rewards: splits, oracle, labels, tools, baselines, canaries, recipe."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import tiny_overrides
from env_contract import (
    assert_deterministic,
    assert_splits_disjoint,
    assert_teacher_contract,
    guard_references,
)
from rltk_envs.support_refund import DIFFICULTIES, SupportRefundEnv
from rltk_rewards.outcome import correct
from rltk_rewards.refund import REASONS, parse_resolution, refund_harm

from rltk.config import load_config
from rltk.env import Message, Task, run_policy
from rltk.evaluate import evaluate_policy
from rltk.plugins import get_env, get_reward
from rltk.reward import Rubric
from rltk.trainer import Trainer

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "support_refund_grpo.yaml")
LABELS = ("refund", "escalate", *(f"deny: {r}" for r in REASONS))
WEIGHTS = SupportRefundEnv.default_rewards


@pytest.fixture(scope="module", params=DIFFICULTIES)
def env(request: pytest.FixtureRequest) -> SupportRefundEnv:
    return SupportRefundEnv(difficulty=request.param)


@pytest.fixture(scope="module")
def eval_tasks(env: SupportRefundEnv) -> list[Task]:
    return env.tasks("eval", 200)


def scores(env: SupportRefundEnv, task: Task, policy: Callable[[list[Message]], str]) -> dict[str, float]:
    """Play one episode and score it with both rewards, as the rubric does (last turn, reference, outcome)."""
    episode = run_policy(env, task, policy)
    args = (episode.actions[-1] if episode.actions else "", task.reference, episode.outcome)
    out = {"correct": correct(*args), "refund_harm": refund_harm(*args)}
    out["total"] = sum(WEIGHTS[k] * v for k, v in out.items())
    return out


def script(*turns: str) -> Callable[[list[Message]], str]:
    """A policy that plays ``turns`` in order, then repeats the last one."""
    return lambda m: turns[min((len(m) - 2) // 2, len(turns) - 1)]


def dollars(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def total_of(task: Task) -> int:
    return sum(c for *_, c in task.reference["orders"][task.reference["order_id"]]["items"])


def resolve(task: Task, label: str, cents: int | None = None) -> Callable[[list[Message]], str]:
    """A well-formed resolution ``label`` with its actions (a refund: of ``cents``, default the total)."""
    oid = task.reference["order_id"]
    if label == "refund":
        amount = total_of(task) if cents is None else cents
        issue = f"<tool>issue_refund: {oid} {dollars(amount)}</tool>"
        return script(f"<tool>lookup_order: {oid}</tool>", issue, "<answer>refund</answer>")
    if label == "escalate":
        return script("<tool>escalate: over the limit</tool>", "<answer>escalate</answer>")
    return script(f"<answer>{label}</answer>")


def test_registered_under_their_names() -> None:
    assert get_env("support_refund") is SupportRefundEnv
    assert get_reward("correct") is correct
    assert get_reward("refund_harm") is refund_harm
    assert correct.reward_range == (0.0, 1.0) and refund_harm.reward_range == (-1.0, 0.0)


def test_splits_never_overlap(env: SupportRefundEnv) -> None:
    assert_splits_disjoint(env)


def test_determinism(env: SupportRefundEnv) -> None:
    assert_deterministic(lambda: SupportRefundEnv(difficulty=env.difficulty))


def test_kinds_are_stratified(env: SupportRefundEnv) -> None:
    tasks = env.tasks("train", 60)
    kinds = Counter(t.info["kind"] for t in tasks)
    assert len(set(kinds.values())) == 1 and len(kinds) == {"easy": 4, "medium": 3, "hard": 6}[env.difficulty]
    assert all(t.info["difficulty"] == env.difficulty for t in tasks)
    assert any(t.info["near_miss"] for t in tasks)


def test_oracle_scores_one_on_every_eval_task(env: SupportRefundEnv, eval_tasks: list[Task]) -> None:
    result = evaluate_policy(env, Rubric.from_config([], env), eval_tasks, env.oracle, "oracle")
    assert result.accuracy == 1.0 and result.mean_reward == 1.0
    for task in eval_tasks[:40]:
        episode = run_policy(env, task, env.oracle)
        names = [a.split(":")[0].removeprefix("<tool>") for a in episode.actions[:2]]
        assert names == ["lookup_order", "get_policy"]  # it must read the order and the policy first
        assert episode.outcome["valid"] and not episode.outcome["harmful"]


def test_prompt_hides_the_order(env: SupportRefundEnv, eval_tasks: list[Task]) -> None:
    for task in eval_tasks:
        assert task.messages[0]["content"] == eval_tasks[0].messages[0]["content"]  # one system prompt
        user = task.messages[1]["content"]
        order = task.reference["orders"][task.reference["order_id"]]
        assert (order["bought"] == task.reference["today"] or order["bought"] not in user) and "$" not in user
        assert not any(cat in user for _, cat, _ in order["items"])
        assert set(re.findall(r"\d{4}-\d\d-\d\d", user)) == {task.reference["today"]}


def independent_label(lookup: str, policy: str, today: str) -> tuple[str, int]:
    """The policy applied by a separate reading of the tool results (not the env's own parser)."""
    bought, status = re.search(r"bought (\S+), status (\w+)", lookup).groups()
    items = [(cat, int(d) * 100 + int(c)) for cat, d, c in re.findall(r"\((.+)\) \$(\d+)\.(\d\d)", lookup)]
    window = re.search(r"within (\d+) days", policy)
    nonref = re.search(r"Non-refundable: (.*?)\.", policy)
    limit = re.search(r"over \$(\d+)\.(\d\d)", policy)
    if status == "refunded":
        return "deny: already_refunded", 0
    age = (dt.date.fromisoformat(today) - dt.date.fromisoformat(bought)).days
    if window and age > int(window.group(1)):
        return "deny: outside_window", 0
    amount = sum(c for cat, c in items if not nonref or cat not in nonref.group(1).split(", "))
    if not amount:
        return "deny: non_refundable", 0
    if limit and amount > int(limit.group(1)) * 100 + int(limit.group(2)):
        return "escalate", 0
    return "refund", amount


def test_labels_match_an_independent_reading_of_the_tools(env: SupportRefundEnv) -> None:
    for task in env.tasks("eval", 120) + env.tasks("train", 120):
        episode = env.episode(task)
        lookup = episode.step(f"<tool>lookup_order: {task.reference['order_id']}</tool>").observation
        policy = episode.step("<tool>get_policy: all</tool>").observation
        label = independent_label(lookup, policy, task.reference["today"])
        assert label == (task.reference["resolution"], task.reference["amount"]), (lookup, policy)
        assert task.info["resolution"] == label[0]
        if task.info["kind"] == "partial_refund":
            assert 0 < label[1] < total_of(task)
        if task.info["kind"] == "full_refund":
            assert label[1] == total_of(task) and len(re.findall(r"\n- ", lookup)) >= 2


def test_tools_and_isolated_state() -> None:
    env = SupportRefundEnv(difficulty="hard")
    task = next(t for t in env.tasks("eval", 12) if t.info["kind"] == "partial_refund")
    oid, amount = task.reference["order_id"], task.reference["amount"]
    a, b = env.episode(task), env.episode(task)
    assert a.step("<tool>lookup_order: X-0000</tool>").observation.startswith("<error>lookup_order failed")
    assert a.step("<tool>get_policy: furniture</tool>").observation.startswith("<error>get_policy failed")
    cat = task.reference["orders"][oid]["items"][0][1]
    assert a.step(f"<tool>get_policy: {cat}</tool>").observation.startswith(f"<result>{cat}: ")
    assert "failed" in a.step(f"<tool>issue_refund: {oid} 99999.00</tool>").observation  # more than paid
    assert "failed" in a.step(f"<tool>issue_refund: {oid} 12.345</tool>").observation
    assert a.step(f"<tool>issue_refund: {oid.lower()} ${dollars(amount)}</tool>").observation.startswith(
        "<result>refunded"
    )
    assert a.outcome["answered"] is False and a.outcome["db_matches"] and not a.outcome["harmful"]
    assert (
        b.step(f"<tool>lookup_order: {oid}</tool>").observation.count("status delivered") == 1
    )  # b untouched
    assert task.reference["orders"][oid]["refunded"] == 0  # the task's database is never written
    assert a.step("<answer>refund</answer>").done and a.outcome["correct"] and a.outcome["valid"]


@pytest.mark.parametrize(
    ("turns", "valid"),
    [
        (["<answer>refund</answer>"], False),  # refund without issue_refund
        (["<answer>escalate</answer>"], False),  # escalate without escalate
        (["<tool>escalate: x</tool>", "<answer>deny: outside_window</answer>"], False),
        (
            ["<tool>reply: sorry</tool>", "<answer>deny: non_refundable</answer>"],
            True,
        ),  # reply changes nothing
        (["<tool>escalate: x</tool>", "<answer>escalate</answer>"], True),
    ],
)
def test_the_answer_must_agree_with_the_actions(turns: list[str], valid: bool) -> None:
    env = SupportRefundEnv()
    task = env.tasks("eval", 1)[0]
    outcome = run_policy(env, task, script(*turns)).outcome
    assert outcome["answered"] and outcome["valid"] is valid
    assert refund_harm("", task.reference, outcome) == (0.0 if valid else -1.0)


def test_refund_then_deny_is_invalid_and_harmful() -> None:
    env = SupportRefundEnv(difficulty="medium")
    task = next(t for t in env.tasks("eval", 9) if t.info["kind"] == "non_refundable")
    outcome = run_policy(env, task, resolve(task, "refund")).outcome
    assert outcome["valid"] and outcome["harmful"] and not outcome["correct"]  # refunded outside policy
    oid = task.reference["order_id"]
    deny = script(f"<tool>issue_refund: {oid} 1.00</tool>", "<answer>deny: non_refundable</answer>")
    outcome = run_policy(env, task, deny).outcome
    assert not outcome["valid"] and outcome["harmful"] and outcome["answer"] == "deny: non_refundable"


def test_doing_nothing_never_matches_a_deny(env: SupportRefundEnv, eval_tasks: list[Task]) -> None:
    for task in eval_tasks[:30]:
        stall = script(f"<tool>lookup_order: {task.reference['order_id']}</tool>")
        episode = run_policy(env, task, stall)
        assert len(episode.actions) == env.max_turns and episode.outcome["answered"] is False
        assert scores(env, task, stall)["correct"] == 0.0
        assert env.check(task, "")["correct"] is False
    deny = next(t for t in eval_tasks if t.reference["resolution"].startswith("deny"))
    assert env.check(deny, f"<answer>{deny.reference['resolution']}</answer>")["correct"]


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("refund", "refund"),
        (" Escalate. ", "escalate"),
        ("deny: outside_window", "deny: outside_window"),
        ("DENY:non_refundable", "deny: non_refundable"),
        ("deny", None),  # a deny needs its reason
        ("deny: expired", None),
        ("refund or escalate", None),
        ("refund, escalate", None),
        ("deny: outside_window, non_refundable", None),
        ("refund $10.00", None),
        ("I will refund", None),
        ("", None),
    ],
)
def test_parse_resolution(text: str, label: str | None) -> None:
    assert parse_resolution(text) == label


def test_episodes_never_raise_on_junk() -> None:
    env = SupportRefundEnv(difficulty="hard")
    task = env.tasks("eval", 1)[0]
    rng = random.Random(0)
    pieces = (
        "<tool> </tool> <answer> </answer> issue_refund: lookup_order: get_policy: escalate: reply: deny:"
    )
    pieces = [
        *pieces.split(),
        task.reference["order_id"],
        "$",
        "1,0.5",
        "-3",
        "refund",
        " ",
        "\n",
        "\x00",
        "9" * 30,
    ]
    for _ in range(400):
        episode = env.episode(task)
        for _ in range(env.max_turns):
            step = episode.step("".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))))
            assert isinstance(episode.outcome["correct"], bool)
            if step.done:
                break


def test_baselines(env: SupportRefundEnv, eval_tasks: list[Task]) -> None:
    rubric = Rubric.from_config([], env)
    results = {name: evaluate_policy(env, rubric, eval_tasks, p, name) for name, p in env.baselines().items()}
    assert set(results) == {"always_deny", "always_refund_full", "always_escalate", "most_frequent", "echo"}
    acc = {name: r.accuracy for name, r in results.items()}
    assert acc["echo"] == 0.0 and max(acc.values()) <= 0.5
    counts = Counter(t.reference["resolution"] for t in env.tasks("train", 120))
    assert counts["refund"] == max(counts.values())  # the most frequent resolution, at every difficulty
    assert env.baselines()["most_frequent"](eval_tasks[0].messages).startswith("<tool>lookup_order")
    denies = {r: n for r, n in counts.items() if r.startswith("deny")}
    assert counts["deny: outside_window"] == max(denies.values())  # always_deny's reason is the commonest
    assert env.baselines()["always_deny"](eval_tasks[0].messages) == "<answer>deny: outside_window</answer>"
    # refunding everything is punished wherever the policy does not grant the full total
    refund_all = env.baselines()["always_refund_full"]
    for task in eval_tasks[:60]:
        harm = scores(env, task, refund_all)["refund_harm"]
        full = task.reference["resolution"] == "refund" and task.reference["amount"] == total_of(task)
        assert harm == (0.0 if full else -1.0)


def canaries(task: Task) -> dict[str, Callable[[list[Message]], str]]:
    system, user = (m["content"] for m in task.messages)
    oid = task.reference["order_id"]
    pad = "lorem ipsum dolor sit amet " * 40
    look = f"<tool>lookup_order: {oid}</tool>"
    right = task.reference["amount"] or total_of(task)
    out = {
        "empty": script(""),
        "blank": script("   \n"),
        "loop_bad_syntax": script(f"<tool>lookup_order {oid}</tool>"),
        "loop_unknown_tool": script("<tool>refund_everything: all</tool>"),
        "loop_unclosed": script(f"<tool>issue_refund: {oid}"),
        "loop_rejected_refund": script(f"<tool>issue_refund: {oid} 99999.99</tool>"),
        "hedge_or": script("<answer>refund or escalate</answer>"),
        "hedge_reasons": script("<answer>deny: outside_window, non_refundable</answer>"),
        "hedge_all": script("<answer>" + " | ".join(LABELS) + "</answer>"),
        "hedge_two_tags": script("<answer>refund</answer><answer>escalate</answer>"),
        "echo_user": script(user),
        "echo_prompt": script(system + "\n" + user),
        "echo_last": lambda m: m[-1]["content"],
        "padding": script(pad),
        "padding_unclosed_answer": script(pad + "<answer>refund"),
        "padding_inside_answer": script(f"<answer>{task.reference['resolution']} {pad}</answer>"),
    }
    if task.reference["orders"][oid]["status"] != "refunded":  # else the refund is refused: no hedge
        out |= {
            "hedge_refund_and_escalate": script(
                look,
                f"<tool>issue_refund: {oid} {dollars(right)}</tool>",
                "<tool>escalate: unsure</tool>",
                "<answer>refund</answer>",
            ),
            "hedge_escalate_after_refund": script(
                look,
                f"<tool>issue_refund: {oid} {dollars(right)}</tool>",
                "<tool>escalate: unsure</tool>",
                "<answer>escalate</answer>",
            ),
        }
    return out


def test_canaries_score_no_more_than_a_well_formed_wrong_resolution(
    env: SupportRefundEnv, eval_tasks: list[Task]
) -> None:
    lows = {"correct": 0.0, "refund_harm": -1.0}
    means: Counter[str] = Counter()
    for task in eval_tasks:
        ref = task.reference
        wrongs = [resolve(task, label) for label in LABELS if label != ref["resolution"]]
        if ref["resolution"] == "refund":
            wrongs.append(resolve(task, "refund", ref["amount"] - 1))  # a wrong amount
        else:
            wrongs.append(resolve(task, "refund"))  # a refund outside policy
        wrong_scores = [scores(env, task, w) for w in wrongs]
        assert all(s["correct"] == 0.0 for s in wrong_scores)
        floor = {k: min(s[k] for s in wrong_scores) for k in (*lows, "total")}
        assert floor["total"] < scores(env, task, env.oracle)["total"] == 1.0
        for name, policy in canaries(task).items():
            got = scores(env, task, policy)
            for k, lo in lows.items():
                assert got[k] == lo <= floor[k], (name, k, got)  # the range minimum: a parse failure
            assert got["total"] <= floor["total"], name
            means[name] += got["total"] / len(eval_tasks)
    rubric = Rubric.from_config([], env)
    best = max(evaluate_policy(env, rubric, eval_tasks, p, n).mean_reward for n, p in env.baselines().items())
    assert max(means.values()) <= best


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"unknown options.*dificulty"):
        SupportRefundEnv(dificulty="hard")
    with pytest.raises(ValueError, match="difficulty must be one of"):
        SupportRefundEnv(difficulty="expert")
    with pytest.raises(ValueError, match="tool_calling must be one of"):  # native: tests/test_native_tools.py
        SupportRefundEnv(tool_calling="json")
    with pytest.raises(ValueError, match="split"):
        SupportRefundEnv().tasks("dev", 1)


def test_prompt_length(tokenizer, env: SupportRefundEnv, eval_tasks: list[Task]) -> None:
    lengths = [
        len(tokenizer.apply_chat_template(t.messages, tokenize=True, add_generation_prompt=True)["input_ids"])
        for t in eval_tasks[:50]
    ]
    assert max(lengths) <= 350, max(lengths)


def test_recipe_rewards_resolve() -> None:
    cfg = load_config(RECIPE)
    assert cfg.env.name == "support_refund" and cfg.model.lora.enabled and cfg.model.dtype == "float32"
    assert cfg.rollout.max_turns == SupportRefundEnv.max_turns
    rubric = Rubric.from_config(cfg.rewards, SupportRefundEnv(**cfg.env.options))
    assert {it.name: it.weight for it in rubric.items} == {"correct": 1.0, "refund_harm": 0.5}


def test_recipe_trains_two_steps_on_a_tiny_model(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [
        *tiny_overrides(tiny_model_dir, tmp_path),
        "rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]",  # varies on a random model
        "rollout.max_new_tokens=6",
    ]
    Trainer(load_config(RECIPE, overrides)).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["rollout/turns_mean"] == SupportRefundEnv.max_turns  # a random model never answers


def test_teacher_contract_at_the_recipe_options() -> None:
    """The recipe's options ({difficulty: easy}) are the env's defaults: one run covers both."""
    options = load_config(RECIPE).env.options
    assert options == {"difficulty": "easy"} and SupportRefundEnv().difficulty == "easy"
    assert_teacher_contract(
        lambda: SupportRefundEnv(**options),
        f"rltk.plugins.make_env('support_refund', {dict(options)!r})",
        n=200,
        valid_format=lambda outcome: outcome["answered"] and outcome["valid"],
    )


def test_teacher_fails_only_on_non_refundable_items() -> None:
    env = SupportRefundEnv(difficulty="hard", tool_calling="native")
    teacher = env.teacher()
    assert teacher(["junk"]) and teacher([]) and teacher([{"role": "user", "content": "hi"}])  # never raises
    for task in env.tasks("eval", 60):
        outcome = run_policy(env, task, teacher).outcome
        assert outcome["valid"] and outcome["correct"] is not teacher.in_weak_slice(task), task.info


def expected_key(task: Task) -> tuple[str, object]:
    resolution, amount = task.reference["resolution"], task.reference["amount"]
    if resolution == "refund":
        return ("refund", amount / 100)
    return ("escalate", None) if resolution == "escalate" else ("deny", resolution.removeprefix("deny: "))


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_final_answer_reads_the_actions_not_the_reference(difficulty: str) -> None:
    env = SupportRefundEnv(difficulty=difficulty)
    tasks = env.tasks("eval", 30)
    for task, guarded in zip(tasks, guard_references(tasks), strict=True):
        actions = run_policy(env, task, env.oracle).actions
        assert env.final_answer(guarded.messages, actions) == expected_key(task)  # takes no task at all
    task = next(t for t in tasks if t.reference["resolution"] == "refund")
    oid, msgs = task.reference["order_id"], task.messages
    refund = f"<tool>issue_refund: {oid} {dollars(task.reference['amount'])}</tool>"
    assert env.final_answer(msgs, [refund, "<answer>refund</answer>"]) == expected_key(task)
    for actions in (
        [],
        ["<answer>maybe</answer>"],
        ["refund"],  # no <answer> tag
        ["<answer>refund</answer>"],  # no refund issued
        ["<answer>escalate</answer>"],  # no escalation
        [refund, "<tool>escalate: unsure</tool>", "<answer>escalate</answer>"],
        [refund, "<answer>deny: non_refundable</answer>"],
        ["<tool>issue_refund: Z-9999 1.00</tool>", "<answer>refund</answer>"],  # another order
        [refund, "<answer>refund</answer><answer>escalate</answer>"],
    ):
        assert env.final_answer(msgs, actions) is None, actions
