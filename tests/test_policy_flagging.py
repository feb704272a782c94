"""The policy-flagging env and its rewards: oracle, splits, balance, baselines, parser, canaries."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from env_contract import assert_deterministic, assert_splits_disjoint, assert_teacher_contract
from rltk_envs.flagging_prompt import RULES
from rltk_envs.policy_flagging import DIFFICULTIES, PolicyFlaggingEnv
from rltk_rewards.flagging import answer_format, flag_decision, flag_rule, parse_answer

from rltk.config import load_config
from rltk.env import prompt_hash, run_policy, split_of
from rltk.plugins import get_env, get_reward

DATA = json.loads((Path(__file__).parents[1] / "envs" / "data" / "policy_flagging.json").read_text())
BASIC = DATA["basic_policy"]
RECIPES = Path(__file__).parents[1] / "recipes"


def independent_reading(user: str) -> dict:
    """Policy and transaction by a separate reading of the prompt (not the env's own parser); dollars."""

    def dollars(s: str) -> float:
        return float(s.replace(",", ""))

    def names(s: str) -> list[str]:
        return s.replace(" or ", ", ").split(", ")

    limit, window = re.search(r"more than (\d+) transactions in the last (\w+)", user).groups()
    r4 = re.search(r"R4: amount over \$([\d,.]+) and destination is (.+)", user)
    return {
        "threshold": dollars(re.search(r"over \$([\d,.]+)", user).group(1)),  # the first: R1's
        "listed": names(re.search(r"destination is (.+)", user).group(1)),  # the first: R2's
        "limit": int(limit),
        "lower": dollars(r4.group(1)) if r4 else None,
        "watch": names(r4.group(2)) if r4 else [],
        "amount": dollars(re.search(r"Amount: \$([\d,.]+)", user).group(1)),
        "country": re.search(r"To: (.+)", user).group(1),
        "count": int(re.search(rf"Transactions in last {window}: (\d+)", user).group(1)),
    }


def independent_violations(user: str) -> list[str]:
    """The rules applied by a separate reading of the prompt (not the env's own parser)."""
    x = independent_reading(user)
    broken = {
        "R1": x["amount"] > x["threshold"],
        "R2": x["country"] in x["listed"],
        "R3": x["count"] > x["limit"],
    }
    if x["lower"] is not None:
        broken["R4"] = x["amount"] > x["lower"] and x["country"] in x["watch"]
    return [r for r, b in broken.items() if b]


@pytest.fixture(scope="module", params=DIFFICULTIES)
def env(request: pytest.FixtureRequest) -> PolicyFlaggingEnv:
    return PolicyFlaggingEnv(difficulty=request.param)


def test_registered_under_its_name() -> None:
    assert get_env("policy_flagging") is PolicyFlaggingEnv
    for name in ("flag_decision", "flag_rule", "answer_format"):
        assert callable(get_reward(name))


@pytest.mark.parametrize("split", ["eval", "train"])
def test_oracle_scores_one_on_every_task(env: PolicyFlaggingEnv, split: str) -> None:
    tasks = env.tasks(split, 400)
    for task in tasks:
        outcome = run_policy(env, task, env.oracle).outcome
        assert outcome["correct"] and outcome["rule_correct"] and outcome["exact_format"], task
        answer = env.oracle(task.messages)
        assert flag_decision(answer, task.reference, outcome) == 1.0
        assert flag_rule(answer, task.reference, outcome) in (1.0, None)
        assert answer_format(answer, task.reference, outcome) == 1.0


def test_labels_match_an_independent_reading_of_the_prompt(env: PolicyFlaggingEnv) -> None:
    for task in env.tasks("eval", 400) + env.tasks("train", 200):
        broken = independent_violations(task.messages[-1]["content"])
        assert len(broken) <= 1, (broken, task.messages[-1]["content"])  # at most ONE rule broken
        assert task.reference == {
            "label": "FLAG" if broken else "CLEAR",
            "rule": broken[0] if broken else None,
            "ask_rule": True,
            "checklist": False,
            **({"n_rules": 4} if env.difficulty == "combined" else {}),
        }
        assert task.info["rule"] == task.reference["rule"] and task.info["difficulty"] == env.difficulty


def test_splits_never_overlap(env: PolicyFlaggingEnv) -> None:
    assert_splits_disjoint(env, (2000, 400, 400))


@pytest.mark.parametrize("split", ["eval", "test", "train"])
def test_balance(env: PolicyFlaggingEnv, split: str) -> None:
    for n in (48, 400):
        tasks = env.tasks(split, n)
        flagged = Counter(t.reference["rule"] for t in tasks if t.reference["label"] == "FLAG")
        clear = [t for t in tasks if t.reference["label"] == "CLEAR"]
        near = Counter(t.info["near_miss_rule"] for t in clear if t.info["near_miss"])
        assert sum(flagged.values()) == n // 2 and len(clear) == n // 2
        assert sum(near.values()) == n // 4
        assert all(not t.info["near_miss"] for t in tasks if t.reference["label"] == "FLAG")
        k = len(env.rules)
        if n == 48:  # whole blocks: exact
            assert flagged == {r: 24 // k for r in env.rules} and near == {r: 12 // k for r in env.rules}
        else:  # 200 flags / 100 near misses: equal up to the remainder of 3 (or 4)
            assert max(flagged.values()) - min(flagged.values()) <= 1 and len(flagged) == k
            assert max(near.values()) - min(near.values()) <= 1 and len(near) == k


def test_near_misses_are_near() -> None:
    env = PolicyFlaggingEnv()
    lookalikes = {DATA["sanctionable"][c] for c in BASIC["countries"]}
    seen = Counter()
    for t in env.tasks("eval", 400):
        if not t.info["near_miss"]:
            continue
        user = t.messages[-1]["content"]
        rule = t.info["near_miss_rule"]
        seen[rule] += 1
        if rule == "R1":
            amount = float(re.search(r"Amount: \$([\d,.]+)", user).group(1).replace(",", ""))
            assert BASIC["threshold_dollars"] - 100 <= amount <= BASIC["threshold_dollars"]
        elif rule == "R2":
            assert re.search(r"To: (.+)", user).group(1) in lookalikes
        else:
            assert f"Transactions in last 24h: {BASIC['limit']}" in user
    assert set(seen) == {"R1", "R2", "R3"}


def test_combined_adds_r4_to_a_varied_policy() -> None:
    env = PolicyFlaggingEnv(difficulty="combined")
    assert env.rules == (*RULES, "R4") and PolicyFlaggingEnv(difficulty="varied").rules == RULES
    watch_candidates = set(DATA["combined_policy"]["watch_candidates"])
    assert watch_candidates <= set(DATA["allowed"])
    policies = set()
    for t in env.tasks("eval", 200):
        x = independent_reading(t.messages[-1]["content"])
        assert x["lower"] / x["threshold"] in DATA["combined_policy"]["lower_fractions"]
        assert 2 <= len(x["watch"]) <= 3 and set(x["watch"]) <= watch_candidates
        assert not set(x["watch"]) & set(x["listed"])
        policies.add(t.messages[-1]["content"].split("\n\n")[0])
    assert len(policies) > 190  # drawn per task


def test_combined_eval_oracle_and_balance() -> None:
    env = PolicyFlaggingEnv(difficulty="combined")
    tasks = env.tasks("eval", 200)
    assert all(run_policy(env, t, env.oracle).outcome["rule_correct"] for t in tasks)  # 100%
    assert "R4: amount over $" in tasks[0].messages[-1]["content"]
    assert tasks[0].messages[0]["content"].endswith("FLAG R3, FLAG R4 or CLEAR.")
    flagged = Counter(t.reference["rule"] for t in tasks if t.reference["label"] == "FLAG")
    assert flagged == {"R1": 25, "R2": 25, "R3": 25, "R4": 25}
    near = Counter(t.info["near_miss_rule"] for t in tasks if t.info["near_miss"])
    assert sum(near.values()) == 50 and near["R4"] >= 12
    # R4 near misses: exactly one of R4's two conditions holds, nothing is broken; both kinds occur
    kinds = Counter()
    for t in tasks:
        if t.info["near_miss_rule"] == "R4":
            x = independent_reading(t.messages[-1]["content"])
            over, listed = x["amount"] > x["lower"], x["country"] in x["watch"]
            assert over != listed and not independent_violations(t.messages[-1]["content"])
            kinds[listed] += 1
            if listed:  # at or just under the lower threshold
                assert x["lower"] - 100 <= x["amount"] <= x["lower"]
            else:  # over it, to a watch-list candidate the policy does not list
                assert x["country"] in DATA["combined_policy"]["watch_candidates"]
    assert kinds[True] and kinds[False]


def test_combined_flag_r4_breaks_only_r4() -> None:
    env = PolicyFlaggingEnv(difficulty="combined")
    r4 = [t for t in env.tasks("eval", 400) + env.tasks("train", 400) if t.reference["rule"] == "R4"]
    assert len(r4) == 100
    for t in r4:
        x = independent_reading(t.messages[-1]["content"])
        assert x["lower"] < x["amount"] <= x["threshold"], x  # over R4's threshold, not over R1's
        assert x["country"] in x["watch"] and x["country"] not in x["listed"], x
        assert x["count"] <= x["limit"], x
    # and no task of another label breaks R4 (it is broken only on purpose)
    others = [t for t in env.tasks("eval", 400) if t.reference["rule"] != "R4"]
    assert not any("R4" in independent_violations(t.messages[-1]["content"]) for t in others)


def test_basic_policy_is_identical_across_tasks() -> None:
    tasks = PolicyFlaggingEnv().tasks("train", 50)
    assert len({t.messages[0]["content"] for t in tasks}) == 1
    assert len({t.messages[1]["content"].split("\n\n")[0] for t in tasks}) == 1
    varied = PolicyFlaggingEnv(difficulty="varied").tasks("train", 50)
    assert len({t.messages[1]["content"].split("\n\n")[0] for t in varied}) > 40


def test_determinism(env: PolicyFlaggingEnv) -> None:
    assert_deterministic(lambda: PolicyFlaggingEnv(difficulty=env.difficulty))


def test_unbalanced_train_has_rare_flags() -> None:
    env = PolicyFlaggingEnv(balanced_train=False)
    share = sum(t.reference["label"] == "FLAG" for t in env.tasks("train", 2000)) / 2000
    assert 0.12 < share < 0.18
    assert sum(t.reference["label"] == "FLAG" for t in env.tasks("eval", 400)) == 200  # eval stays balanced


def test_baselines_on_eval(env: PolicyFlaggingEnv) -> None:
    tasks = env.tasks("eval", 400)
    acc = {
        name: sum(run_policy(env, t, policy).outcome["correct"] for t in tasks) / len(tasks)
        for name, policy in env.baselines().items()
    }
    assert set(acc) == {"constant_clear", "constant_flag", *(f"only_{r}" for r in env.rules)}
    assert acc["constant_clear"] == acc["constant_flag"] == 0.5
    for r in env.rules:  # the clear half plus one rule's share of the flagged half
        assert acc[f"only_{r}"] == pytest.approx(1 / 2 + 1 / (2 * len(env.rules)), abs=0.005)
    assert (
        max(acc.values()) < 1.0 == sum(run_policy(env, t, env.oracle).outcome["correct"] for t in tasks) / 400
    )


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"dificulty": "varied"}, "unknown options.*dificulty"),
        ({"difficulty": "hard"}, "difficulty"),
        ({"miss_cost": -1.0}, "miss_cost"),
        ({"false_alarm_cost": float("nan")}, "false_alarm_cost"),
    ],
)
def test_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PolicyFlaggingEnv(**options)


def test_env_costs_become_default_reward_params() -> None:
    env = PolicyFlaggingEnv(miss_cost=4.0, false_alarm_cost=0.5)
    assert env.default_reward_params == {"flag_decision": {"miss_cost": 4.0, "false_alarm_cost": 0.5}}


@pytest.mark.parametrize(
    ("text", "decision", "rule", "exact"),
    [
        ("FLAG R2", "FLAG", "R2", True),
        ("CLEAR", "CLEAR", None, True),
        ("  FLAG R3\n", "FLAG", "R3", True),
        ("flag r1", "FLAG", "R1", False),
        ("Flag: R1.", "FLAG", "R1", False),
        ("FLAG (R2)", "FLAG", "R2", False),
        ("**CLEAR**", "CLEAR", None, False),
        ("clear!", "CLEAR", None, False),
        ("<answer>FLAG R3</answer>", "FLAG", "R3", False),
        ("Answer: CLEAR", "CLEAR", None, False),
        ("FLAG", "FLAG", None, False),
        ("", None, None, False),
        ("FLAG R1 or CLEAR", None, None, False),
        ("CLEAR or FLAG", None, None, False),
        ("FLAG R1 R2", None, None, False),
        ("FLAG R1, R3", None, None, False),
        ("FLAG R4", "FLAG", "R4", True),  # R4 exists at difficulty="combined"
        ("flag (r4)", "FLAG", "R4", False),
        ("FLAG R5", None, None, False),
        ("FLAG R0", None, None, False),
        ("CLEAR R1", None, None, False),
        ("I would FLAG R2", None, None, False),
        ("FLAG R2 because the country is sanctioned", None, None, False),
        ("FLAGGED", None, None, False),
        ("<answer>FLAG R1</answer><answer>CLEAR</answer>", None, None, False),
    ],
)
def test_parse_answer(text: str, decision: str | None, rule: str | None, exact: bool) -> None:
    assert tuple(parse_answer(text)) == (decision, rule, exact)


def test_check_verdict() -> None:
    env = PolicyFlaggingEnv()
    task = next(t for t in env.tasks("eval", 20) if t.reference["rule"] == "R2")
    assert env.check(task, "FLAG R2") == {
        "cost": 0.0,
        "answer": "FLAG",
        "decision": "FLAG",
        "rule": "R2",
        "correct": True,
        "rule_correct": True,
        "exact_format": True,
    }
    wrong_rule = env.check(task, "flag r1")
    assert wrong_rule["correct"] and not wrong_rule["rule_correct"] and not wrong_rule["exact_format"]
    assert env.check(task, "maybe")["decision"] is None and not env.check(task, "maybe")["correct"]
    assert env.check(task, "maybe")["answer"] is None  # unparseable: in no class for balance_answers


def test_check_cost_follows_the_cost_matrix() -> None:
    env = PolicyFlaggingEnv(miss_cost=5.0, false_alarm_cost=2.0)
    tasks = env.tasks("eval", 20)
    flagged = next(t for t in tasks if t.reference["label"] == "FLAG")
    clear = next(t for t in tasks if t.reference["label"] == "CLEAR")
    assert env.check(flagged, "CLEAR")["cost"] == 5.0
    assert env.check(flagged, "maybe")["cost"] == 5.0  # no parse, no flag raised: a miss
    assert env.check(clear, "FLAG R1")["cost"] == 2.0
    assert env.check(clear, "CLEAR")["cost"] == env.check(flagged, "FLAG R3")["cost"] == 0.0


@pytest.mark.parametrize(
    "costs", [{}, {"miss_cost": 5.0, "false_alarm_cost": 1.0}, {"false_alarm_cost": 3.0}]
)
def test_reward_canaries_score_no_more_than_a_well_formed_wrong_answer(costs: dict) -> None:
    env = PolicyFlaggingEnv()
    tasks = env.tasks("eval", 24)
    rewards = {
        "flag_decision": lambda c, ref: flag_decision(c, ref, {}, **costs),
        "flag_rule": lambda c, ref: flag_rule(c, ref, {}),
        "answer_format": lambda c, ref: answer_format(c, ref, {}),
    }
    weights = env.default_rewards
    for task in tasks:
        ref = task.reference
        system, user = (m["content"] for m in task.messages)
        right = env.oracle(task.messages)
        wrongs = ["CLEAR"] if ref["label"] == "FLAG" else ["FLAG R1", "FLAG R2", "FLAG R3"]
        canaries = [
            "",
            "   ",
            "FLAG R1 or CLEAR",
            "FLAG R1, FLAG R2, FLAG R3 or CLEAR",
            user,
            system,
            system + "\n" + user,
            "asdf qwer zxcv " * 40,
            right + " " + "lorem ipsum " * 20,
            "lorem ipsum " * 20 + right,
            "\x00\x01 " + right,
        ]

        def total(c: str, ref: dict = ref) -> float:
            scores = {n: f(c, ref) for n, f in rewards.items()}
            return sum(weights[n] * s for n, s in scores.items() if s is not None)

        for canary in canaries:
            for name, f in rewards.items():
                floor = min(f(w, ref) if f(w, ref) is not None else 0.0 for w in wrongs)
                got = f(canary, ref)
                assert got is None or got <= floor, (name, canary[:40], got, floor)
                lo = get_reward(name).reward_range[0]
                if name == "flag_decision":
                    lo = -max(costs.get("miss_cost", 1.0), costs.get("false_alarm_cost", 1.0))
                assert got is None or got == lo, (name, canary[:40])  # parse failure scores the minimum
            assert total(canary) <= min(total(w) for w in wrongs) < total(right)


def test_flag_decision_costs() -> None:
    flagged, clear = {"label": "FLAG", "rule": "R1"}, {"label": "CLEAR", "rule": None}
    assert flag_decision("CLEAR", flagged, {}, miss_cost=2.0, false_alarm_cost=0.5) == -2.0
    assert flag_decision("FLAG R3", clear, {}, miss_cost=2.0, false_alarm_cost=0.5) == -0.5
    assert flag_decision("FLAG R3", flagged, {}) == 1.0  # wrong rule: the decision is still right
    assert flag_decision("???", clear, {}, miss_cost=2.0, false_alarm_cost=0.5) == -2.0
    assert flag_decision.reward_range == (-1.0, 1.0)
    with pytest.raises(ValueError, match="costs"):
        flag_decision("CLEAR", clear, {}, miss_cost=-1.0)


def test_prompt_length(tokenizer, env: PolicyFlaggingEnv) -> None:
    lengths = [
        len(tokenizer.apply_chat_template(t.messages, tokenize=True, add_generation_prompt=True)["input_ids"])
        for t in env.tasks("eval", 100)
    ]
    assert max(lengths) <= (220 if env.difficulty == "combined" else 200), max(lengths)
    assert min(lengths) >= 100


@pytest.mark.parametrize("difficulty", ["basic", "combined"])
def test_decision_only_prompts_oracle_and_rewards(difficulty: str) -> None:
    env = PolicyFlaggingEnv(difficulty=difficulty, ask_rule=False)
    tasks = env.tasks("eval", 60)
    assert all("Reply with only FLAG or CLEAR." in t.messages[0]["content"] for t in tasks)
    for task in tasks:
        answer = env.oracle(task.messages)
        assert answer in ("FLAG", "CLEAR")
        outcome = env.check(task, answer)
        assert outcome["correct"] and outcome["exact_format"]
        assert flag_decision(answer, task.reference, outcome) == 1.0
        assert flag_rule(answer, task.reference, outcome) is None  # the task did not ask for the rule
        assert answer_format(answer, task.reference, outcome) == 1.0
        assert answer_format("FLAG R1", task.reference, {}) == 0.0  # not the requested format
    assert {p(t.messages) for t in tasks for p in env.baselines().values()} <= {"FLAG", "CLEAR"}
    with_rule = {prompt_hash(t.messages) for t in PolicyFlaggingEnv(difficulty=difficulty).tasks("eval", 60)}
    assert not with_rule & {prompt_hash(t.messages) for t in tasks}  # a different prompt, a different task


@pytest.mark.parametrize("ask_rule", [False, True])
@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_checklist_prompts_oracle_baselines_and_canaries(ask_rule: bool, difficulty: str) -> None:
    env = PolicyFlaggingEnv(difficulty=difficulty, ask_rule=ask_rule, checklist=True)
    n = len(env.rules)
    assert all(f"\n{r}: <" in env.tasks("eval", 1)[0].messages[0]["content"] for r in env.rules)
    tasks = env.tasks("eval", 120)
    for task in tasks:
        answer = env.oracle(task.messages)
        lines = answer.splitlines()
        assert len(lines) == n + 1 and [line[:3] for line in lines[:n]] == [f"{r}:" for r in env.rules]
        # the check lines say which rule is broken, read independently of the oracle
        said = [r for r, line in zip(env.rules, lines[:n], strict=True) if line.endswith("? yes")]
        assert said == independent_violations(task.messages[-1]["content"])
        outcome = env.check(task, answer)
        assert outcome["correct"] and outcome["exact_format"]
        assert flag_decision(answer, task.reference, outcome) == 1.0
        assert answer_format(answer, task.reference, outcome) == 1.0
        assert flag_rule(answer, task.reference, outcome) in ((1.0, None) if ask_rule else (None,))
        wrong = "\n".join(
            [*lines[:n], "CLEAR" if task.reference["label"] == "FLAG" else _flag_answer(ask_rule)]
        )
        floor = flag_decision(wrong, task.reference, {})
        assert floor == -1.0
        checks = "\n".join(lines[:n])
        for canary in (
            "",
            lines[-1],  # the decision without the checks it was asked for
            "\n".join([*lines[: n - 1], lines[-1]]),  # a check line missing
            checks,  # the checks without a decision
            f"{checks}\nFLAG or CLEAR",  # a hedge
            f"{checks}\nCLEAR\nFLAG",  # two answers
            task.messages[-1]["content"],  # an echo of the prompt
            f"{checks}\nI think {lines[-1]}",  # prose around the answer
        ):
            assert flag_decision(canary, task.reference, {}) <= floor, canary
            assert answer_format(canary, task.reference, {}) == 0.0, canary
    for name, policy in env.baselines().items():  # baselines answer in the asked format, so they parse
        assert all(env.check(t, policy(t.messages))["decision"] is not None for t in tasks), name
    assert parse_answer(f"{checks.lower()}\nflag", False, True, n).decision == "FLAG"
    assert not parse_answer(f"{checks.lower()}\nflag", False, True, n).exact


def _flag_answer(ask_rule: bool) -> str:
    return "FLAG R1" if ask_rule else "FLAG"


def test_draw_task_keeps_the_split_and_refuses_repeats() -> None:
    from rltk.env import Task, draw_task

    def candidate(attempt: int) -> Task | None:
        if attempt % 3 == 0:
            return None  # a degenerate draw
        messages = [{"role": "user", "content": f"q{attempt % 40}"}]
        return Task(str(attempt), "eval", messages, {})

    seen: set[str] = set()
    drawn = [draw_task("eval", seen, candidate, attempts=200) for _ in range(3)]
    assert all(split_of(t.messages) == "eval" for t in drawn)
    assert len({prompt_hash(t.messages) for t in drawn}) == 3 == len(seen)
    with pytest.raises(RuntimeError, match="could not draw a new task of split 'eval'"):
        for _ in range(40):
            draw_task("eval", seen, candidate, attempts=200)  # only a few of q0..q39 hash into eval


def test_teacher_contract() -> None:
    """The teacher's contract on 200 eval tasks at the recipes' options (``policy_flagging_grpo`` and the
    README's ``quickstart``), which are the env's default options: one run covers both. It scores 85.5%: its
    stale R1 threshold and R2 list err on ``within_10pct_under`` clears and ``listed_position`` 4-5 flags."""
    for recipe in ("policy_flagging_grpo.yaml", "quickstart.yaml"):
        cfg = load_config(str(RECIPES / recipe), [])
        assert cfg.env.name == "policy_flagging" and cfg.env.options == {}  # = the default options
    figures = assert_teacher_contract(
        lambda: PolicyFlaggingEnv(),
        "rltk.plugins.make_env('policy_flagging', {})",
        n=200,
        valid_format=lambda outcome: outcome["exact_format"],
    )
    assert set(figures) == {"teacher", "oracle", "best_trivial", "errors_in_slices"}


@pytest.mark.parametrize(
    "options",
    [
        {"difficulty": "combined"},
        {"ask_rule": False},
        {"checklist": True},
        {"difficulty": "combined", "checklist": True},
    ],
)
def test_teacher_answers_in_the_asked_format_and_errs_only_in_its_slices(options: dict) -> None:
    env = PolicyFlaggingEnv(**options)
    teacher = env.teacher()
    for task in env.tasks("eval", 60):
        outcome = run_policy(env, task, teacher).outcome
        assert outcome["exact_format"], task.id
        assert outcome["correct"] or teacher.in_weak_slice(task), task.id


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user", "content": ""}],
        [
            {"role": "system", "content": "Reply with only FLAG or CLEAR."},
            {"role": "user", "content": "R1: ?"},
        ],
        [
            {
                "role": "user",
                "content": "R1: amount over $,,, \nR2: destination is \nR3: more than 1 transactions",
            }
        ],
        [{"content": None}],
    ],
)
def test_teacher_never_raises(messages: list) -> None:
    assert PolicyFlaggingEnv().teacher()(messages) == "CLEAR"


@pytest.mark.parametrize(
    "options", [{}, {"ask_rule": False}, {"difficulty": "combined", "checklist": True}, {"checklist": True}]
)
def test_final_answer_is_the_reference_free_vote_key(options: dict) -> None:
    env = PolicyFlaggingEnv(**options)
    other = PolicyFlaggingEnv()  # another env's settings: the prompt's own system message decides the parse
    ask_rule = options.get("ask_rule", True)
    for task in env.tasks("eval", 40):  # final_answer takes no task: it cannot read the reference
        ref = task.reference
        key = f"FLAG {ref['rule']}" if ref["label"] == "FLAG" and ask_rule else ref["label"]
        answer = env.oracle(task.messages)
        assert env.final_answer(task.messages, [answer]) == key == other.final_answer(task.messages, [answer])
        for junk in ("", "maybe", "FLAG R1 or CLEAR", "CLEAR\nFLAG R2"):
            assert env.final_answer(task.messages, [junk]) is None
        assert env.final_answer(task.messages, []) is None
    decision_only = PolicyFlaggingEnv(ask_rule=False).tasks("eval", 1)[0].messages
    assert PolicyFlaggingEnv().final_answer(decision_only, ["FLAG R2"]) == "FLAG"  # the rule is not asked
    with_rule = PolicyFlaggingEnv().tasks("eval", 1)[0].messages
    assert PolicyFlaggingEnv().final_answer(with_rule, [" flag r2. "]) == "FLAG R2"
    assert PolicyFlaggingEnv().final_answer(with_rule, ["FLAG"]) == "FLAG"  # no rule named
    checklist = PolicyFlaggingEnv(checklist=True).tasks("eval", 1)[0].messages
    assert PolicyFlaggingEnv().final_answer(checklist, ["CLEAR"]) is None  # the check lines are missing
