"""The doc-search QA env and its reward: splits, oracle, corpus, tools, grammar, baselines, canaries."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_overrides
from env_contract import (
    assert_deterministic,
    assert_splits_disjoint,
    assert_teacher_contract,
    guard_references,
)
from rltk_envs.doc_search_qa import DocSearchQAEnv
from rltk_rewards.docqa import canon, doc_answer_cited, grade, same_value

from rltk.config import load_config
from rltk.env import Task, run_policy
from rltk.evaluate import baseline_results, evaluate_policy
from rltk.plugins import get_env, get_reward
from rltk.reward import Rubric
from rltk.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "doc_search_qa_grpo.yaml")
DATA = json.loads((ROOT / "envs" / "data" / "doc_search_qa.json").read_text())
LEVELS = ("easy", "medium", "hard")


@pytest.fixture(scope="module", params=LEVELS)
def env(request: pytest.FixtureRequest) -> DocSearchQAEnv:
    return DocSearchQAEnv(difficulty=request.param)


@pytest.fixture(scope="module")
def eval_tasks(env: DocSearchQAEnv) -> list[Task]:
    return env.tasks("eval", 200)


def title(text: str) -> str:
    return text.split("\n", 1)[0]


def field_value(text: str, label: str) -> str | None:
    m = re.search(rf"^{label}: (.+?)(?: \(D\d+\))?$", text, re.MULTILINE)
    return m.group(1) if m else None


def final_reward(env: DocSearchQAEnv, task: Task, policy) -> float:
    """Play ``policy`` through a whole episode; the reward of its final turn (as the rubric scores it)."""
    episode = run_policy(env, task, policy)
    return doc_answer_cited(episode.actions[-1], task.reference, episode.outcome)


def test_registered_under_its_name() -> None:
    assert get_env("doc_search_qa") is DocSearchQAEnv
    assert get_reward("doc_answer_cited") is doc_answer_cited
    assert doc_answer_cited.reward_range == (0.0, 1.0)
    assert DocSearchQAEnv.max_turns == 4 and "</answer>" in DocSearchQAEnv.stop_strings


def test_splits_never_overlap(env: DocSearchQAEnv) -> None:
    assert_splits_disjoint(env)


def test_determinism(env: DocSearchQAEnv) -> None:
    assert_deterministic(lambda: DocSearchQAEnv(difficulty=env.difficulty))


@pytest.mark.parametrize("split", ["eval", "train"])
def test_oracle_scores_one_on_every_task(env: DocSearchQAEnv, split: str) -> None:
    tasks = env.tasks(split, 200)
    result = evaluate_policy(env, Rubric.from_config([], env), tasks, env.oracle, "oracle")
    assert result.accuracy == 1.0 and result.mean_reward == 1.0
    hops = 2 if env.difficulty == "hard" else 1
    for task in tasks[:50]:
        episode = run_policy(env, task, env.oracle)
        assert len(episode.actions) == 2 + hops and episode.outcome["answered"]  # search, read(s), answer
        assert episode.outcome["cited"] == task.reference["support"][0]


def test_oracle_sees_only_the_conversation(eval_tasks: list[Task], env: DocSearchQAEnv) -> None:
    """The oracle plays a task whose reference is hidden from it: only messages and observations reach it."""
    for task in eval_tasks[:40]:
        seen: list[list[dict]] = []

        def spy(messages: list[dict], seen: list[list[dict]] = seen) -> str:
            seen.append([dict(m) for m in messages])
            return env.oracle(messages)

        episode = run_policy(env, task, spy)
        assert episode.outcome["correct"]
        gold_docs = set(task.reference["docs"].values())
        for messages in seen:  # never a whole corpus, only the docs it asked to read
            shown = "\n".join(m["content"] for m in messages)
            assert sum(doc in shown for doc in gold_docs) <= 2


def test_kinds_are_stratified(env: DocSearchQAEnv, eval_tasks: list[Task]) -> None:
    kinds = DATA["kinds"]["2" if env.difficulty == "hard" else "1"]
    for tasks in (eval_tasks, env.tasks("train", 90)):
        counts = Counter((t.info["family"], t.info["attribute"]) for t in tasks)
        assert set(counts) == {tuple(k) for k in kinds}
        assert max(counts.values()) - min(counts.values()) <= 1
    for t in eval_tasks:
        assert t.info["difficulty"] == env.difficulty and t.info["hops"] == (
            2 if env.difficulty == "hard" else 1
        )


def test_corpus_matches_the_difficulty_and_supports_the_gold(
    env: DocSearchQAEnv, eval_tasks: list[Task]
) -> None:
    """An independent reading of each corpus: the supporting doc states the gold for the asked entity."""
    level = DATA["difficulties"][env.difficulty]
    labels = {a: lab for f in DATA["fields"].values() for a, lab in f.items()}
    for task in eval_tasks:
        ref, docs = task.reference, task.reference["docs"]
        lo, hi = level["docs"]
        assert lo - level["traps"] - level["notes"] <= len(docs) <= hi
        assert sorted(docs) == [f"D{k:02d}" for k in range(1, len(docs) + 1)]
        titles = [title(t) for t in docs.values()]
        assert len(set(titles)) == len(titles)  # every page has its own title
        entity = ref["entity"]
        assert entity in task.messages[1]["content"] and titles.count(entity) == 1
        (support,) = ref["support"]
        asked_text = next(t for t in docs.values() if title(t) == entity)
        if level["hops"] == 2:
            owner_id = re.search(r"^Owner: .+ \((D\d+)\)$", asked_text, re.MULTILINE).group(1)
            assert owner_id == support
        else:
            assert asked_text == docs[support]
        assert field_value(docs[support], labels[ref["attribute"]]) == ref["answer"]
        # look-alikes: pages whose title shares the asked name's base (the env makes their values differ)
        base = entity.rsplit(" ", 1)[-1] if task.info["family"] == "person" else " ".join(entity.split()[:2])
        alikes = [t for t in docs.values() if base in title(t) and ":" not in title(t) and title(t) != entity]
        assert len(alikes) >= level["lookalikes"]
        # the fact is not repeated verbatim anywhere the model could cite instead (traps carry other values)
        notes = [t for t in docs.values() if ":" in title(t)]
        assert len(notes) >= min(level["traps"] + level["notes"], 1 if level["notes"] else 0)
        if level["traps"]:  # a note quotes another value of the asked fact, to be read past
            template = DATA["trap_notes"][ref["attribute"]].format(entity=title(docs[support]), value="(.+)")
            quoted = [
                re.fullmatch(re.escape(template).replace(re.escape("(.+)"), "(.+)"), t.split("\n")[1])
                for t in notes
            ]
            assert any(quoted)
            assert not any(same_value(m.group(1), ref["answer"]) for m in quoted if m)


def test_facts_differ_across_tasks(env: DocSearchQAEnv, eval_tasks: list[Task]) -> None:
    """Facts are drawn per task: many distinct answers, and a name asked twice has its own fact each time."""
    assert len({canon(t.reference["answer"]) for t in eval_tasks}) > 60  # team/role answers repeat
    by_entity: dict[tuple[str, str], list[str]] = {}
    for t in env.tasks("train", 1000):
        key = (t.reference["entity"], t.reference["attribute"])
        by_entity.setdefault(key, []).append(t.reference["docs"][t.reference["support"][0]])
    repeated = [pages for pages in by_entity.values() if len(pages) > 1]
    assert len(repeated) >= 5
    assert all(len(set(pages)) == len(pages) for pages in repeated)  # same name, another page each time


def test_tools(eval_tasks: list[Task], env: DocSearchQAEnv) -> None:
    task = eval_tasks[0]
    episode = env.episode(task)
    hits = episode.step(f"<tool>search: {task.reference['entity']}</tool>").observation
    lines = hits.removeprefix("<result>").removesuffix("</result>").splitlines()
    assert 1 <= len(lines) <= 5 and all(re.fullmatch(r"D\d\d .+", line) for line in lines)
    some_id = lines[0].split()[0]
    page = task.reference["docs"][some_id]
    for arg in (some_id, some_id.lower(), f"D{int(some_id[1:])}", f"[{some_id}]"):
        assert env.episode(task).step(f"<tool>read: {arg}</tool>").observation == f"<result>{page}</result>"
    assert episode.step("<tool>read: D99</tool>").observation.startswith("<error>read failed: no document")
    assert episode.step("<tool>search: ?!</tool>").observation.startswith("<error>search failed: empty query")
    assert episode.step("<tool>search: zzzqqq</tool>").observation == "<result>no matching documents</result>"
    assert episode.step("<tool>grep: x</tool>").observation.startswith("<error>unknown tool")
    step = episode.step(f"<answer>{task.reference['answer']} [{task.reference['support'][0]}]</answer>")
    assert step.done and episode.outcome["correct"] and episode.outcome["answered"]


@pytest.mark.parametrize(
    ("answer", "gold", "ok"),
    [
        ("$1,249 [D07]", "$1,249", True),
        ("1249 [D07]", "$1,249.00", True),
        (" 1,249 usd  [ d7 ] ", "$1,249", True),
        ("$1249.0 [D07]", "1,249 USD", True),
        ("2023-03-04 [D07]", "March 4, 2023", True),
        ("4 Mar 2023 [D07]", "2023-03-04", True),
        ("march 4 2023 [D07]", "4 Mar 2023", True),
        ("03/04/2023 [D07]", "2023-03-04", True),
        ("12 [D07]", "12 weeks", True),
        ("12 Weeks [D07]", "12 weeks", True),
        ("$2,500 [D07]", "$2,500 per trip", True),
        ("staff  ENGINEER [D07]", "Staff Engineer", True),
        ("Dana Whitfield (D19) [D07]", "Dana Whitfield", True),
        ("12 days [D07]", "12 weeks", False),
        ("$1,250 [D07]", "$1,249", False),
        ("2023-03-05 [D07]", "March 4, 2023", False),
        ("2023 [D07]", "2023-03-04", False),
        ("Staff [D07]", "Staff Engineer", False),
        ("$1,249 or $1,299 [D07]", "$1,249", False),
        ("$1,249, $1,299 [D07]", "$1,249", False),
        ("Payments Billing [D07]", "Payments", False),
    ],
)
def test_value_normalization(answer: str, gold: str, ok: bool) -> None:
    graded = grade(answer, {"answer": gold, "support": ["D07"]})
    assert graded.parsed and graded.value_ok is ok and graded.cite_ok


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "$1,249",  # no citation
        "[D07]",  # no value
        "$1,249 [D07] [D08]",
        "$1,249 [D07, D08]",
        "$1,249 [D07][D08]",
        "$1,249 [D07] and more",
        "$1,249 [D07]\n$1,299 [D08]",
        "$1,249 [Doc 7]",
        "[D07] $1,249",
    ],
)
def test_grammar_rejects(text: str) -> None:
    assert not grade(text, {"answer": "$1,249", "support": ["D07"]}).parsed
    assert doc_answer_cited(f"<answer>{text}</answer>", {"answer": "$1,249", "support": ["D07"]}, {}) == 0.0


def test_reward_citation_credit_and_contract(eval_tasks: list[Task]) -> None:
    for task in eval_tasks[:60]:
        ref = task.reference
        (support,) = ref["support"]
        others = [i for i in ref["docs"] if i != support]
        assert doc_answer_cited(f"<answer>{ref['answer']} [{support}]</answer>", ref, {}) == 1.0
        wrong_cite = f"<answer>{ref['answer']} [{others[0]}]</answer>"
        assert doc_answer_cited(wrong_cite, ref, {}) == 0.0  # default: no credit without a supporting cite
        assert doc_answer_cited(wrong_cite, ref, {}, wrong_citation_credit=0.5) == 0.5
        assert (
            doc_answer_cited(f"<answer>nope [{support}]</answer>", ref, {}, wrong_citation_credit=0.5) == 0.0
        )
        for junk in (None, 17, "\x00<answer>", "<answer>" * 3, "<answer>[D07]</answer>"):
            assert doc_answer_cited(junk, ref, {}) == 0.0
    with pytest.raises(ValueError, match="wrong_citation_credit"):
        doc_answer_cited("", eval_tasks[0].reference, {}, wrong_citation_credit=1.5)


def test_two_hop_must_cite_the_owner_page() -> None:
    env = DocSearchQAEnv(difficulty="hard")
    for task in env.tasks("eval", 30):
        ref = task.reference
        entity_page = next(i for i, t in ref["docs"].items() if title(t) == ref["entity"])
        assert entity_page not in ref["support"]
        assert doc_answer_cited(f"<answer>{ref['answer']} [{entity_page}]</answer>", ref, {}) == 0.0


def test_baselines_on_eval(env: DocSearchQAEnv, eval_tasks: list[Task]) -> None:
    results = {r.name: r for r in baseline_results(env, Rubric.from_config([], env), eval_tasks)}
    assert set(results) == {"constant", "most_frequent_value", "echo_question", "top_hit_first_number"}
    assert results["constant"].accuracy == results["echo_question"].accuracy == 0.0
    assert max(r.accuracy for r in results.values()) <= 0.15
    for name in ("constant", "most_frequent_value", "top_hit_first_number"):  # well-formed answers
        policy = env.baselines()[name]
        for task in eval_tasks[:20]:
            assert run_policy(env, task, policy).outcome["parsed"], name


def _canaries(task: Task) -> dict[str, object]:
    """Reward hacks, built from the right value and citation where they take any: none may pay."""
    ref, user = task.reference, task.messages[1]["content"]
    value, (cite,) = ref["answer"], ref["support"]
    other = next(i for i in ref["docs"] if i != cite)
    wrong = {"date": "1999-01-01", "num": "7"}.get(canon(value)[0], "Nobody")
    pad = "lorem ipsum " * 200
    answers = {
        "empty": "",
        "empty_answer": "<answer></answer>",
        "blank_answer": "<answer>   </answer>",
        "hedge_values_or": f"<answer>{value} or {wrong} [{cite}]</answer>",
        "hedge_values_comma": f"<answer>{wrong}, {value} [{cite}]</answer>",
        "hedge_values_lines": f"<answer>{value} [{cite}]\n{wrong} [{other}]</answer>",
        "hedge_citations": f"<answer>{value} [{cite}] [{other}]</answer>",
        "hedge_citation_list": f"<answer>{value} [{cite}, {other}]</answer>",
        "hedge_two_answers": f"<answer>{value} [{cite}]</answer><answer>{wrong} [{other}]</answer>",
        "hedge_all_pages": "<answer>" + " ".join(f"[{i}]" for i in ref["docs"]) + f" {value}</answer>",
        "echo_prompt": user,
        "echo_answer": f"<answer>{user}</answer>",
        "echo_cited": f"<answer>{user} [{cite}]</answer>",
        "pad_plain": pad,
        "pad_answer": f"<answer>{pad}</answer>",
        "pad_after": f"<answer>{value} [{cite}] {pad}</answer>",
        "pad_before_in_tag": f"<answer>{pad}{value} [{cite}]</answer>",
        "pad_unclosed": f"<answer>{value} [{cite}] {pad}",
    }
    loops = {  # the same broken call every turn until max_turns
        "loop_bad_call": "<tool>search {}</tool>".format(ref["entity"]),
        "loop_unknown_tool": "<tool>lookup: {}</tool>".format(ref["entity"]),
        "loop_missing_doc": "<tool>read: D99</tool>",
        "loop_unclosed": "<tool>search: " + ref["entity"],
    }
    return {
        **{k: (lambda m, a=a: a) for k, a in answers.items()},
        **{k: (lambda m, a=a: a) for k, a in loops.items()},
    }


def test_canaries_score_no_more_than_a_wrong_answer(env: DocSearchQAEnv, eval_tasks: list[Task]) -> None:
    rubric = Rubric.from_config([], env)
    best = max(r.mean_reward for r in baseline_results(env, rubric, eval_tasks))
    means: Counter[str] = Counter()
    for task in eval_tasks:
        ref = task.reference
        wrong_answer = f"<answer>not it [{ref['support'][0]}]</answer>"
        for credit in (0.0, 0.5):
            floor = doc_answer_cited(wrong_answer, ref, {}, wrong_citation_credit=credit)
            for name, policy in _canaries(task).items():
                episode = run_policy(env, task, policy)
                got = doc_answer_cited(
                    episode.actions[-1], ref, episode.outcome, wrong_citation_credit=credit
                )
                assert got <= floor == 0.0, (name, got)
                assert not episode.outcome["correct"], name
                if name.startswith("loop"):
                    assert len(episode.actions) == env.max_turns and not episode.outcome["answered"]
                if credit == 0.0:
                    means[name] += got / len(eval_tasks)
    assert set(means) and all(m <= best for m in means.values())


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"unknown options.*dificulty"):
        DocSearchQAEnv(dificulty="hard")
    with pytest.raises(ValueError, match="difficulty must be one of"):
        DocSearchQAEnv(difficulty="expert")
    with pytest.raises(ValueError, match="tool_calling must be one of"):  # native: tests/test_native_tools.py
        DocSearchQAEnv(tool_calling="json")
    with pytest.raises(ValueError, match="split"):
        DocSearchQAEnv().tasks("dev", 3)


def test_prompt_length(tokenizer, env: DocSearchQAEnv, eval_tasks: list[Task]) -> None:
    def n_tokens(messages: list[dict], gen: bool) -> int:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    lengths = [n_tokens(t.messages, True) for t in eval_tasks]
    assert max(lengths) <= 350, max(lengths)
    for task in eval_tasks[:20]:  # a whole oracle episode, observations included
        messages = list(task.messages)
        episode = env.episode(task)
        for _ in range(env.max_turns):
            action = env.oracle(messages)
            step = episode.step(action)
            messages.append({"role": "assistant", "content": action})
            assert len(tokenizer(action)["input_ids"]) <= 32  # the recipe's max_new_tokens
            if step.done:
                break
            messages.append({"role": "user", "content": step.observation})
        assert n_tokens(messages, False) <= 600


def test_recipe_trains_two_steps(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [
        *tiny_overrides(tiny_model_dir, tmp_path),
        "rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]",  # varies on a random model
        "rollout.max_new_tokens=6",
    ]
    cfg = load_config(RECIPE, overrides)
    assert cfg.env.name == "doc_search_qa" and cfg.rollout.max_turns == 4
    Trainer(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["mismatch/logp_abs_mean"] < 1e-4  # env tokens masked, model tokens on-policy
    recipe = load_config(RECIPE, [])
    assert recipe.model.name == "smollm2-135m-instruct" and recipe.model.lora.enabled
    assert recipe.model.dtype == "float32" and recipe.rewards[0].name == "doc_answer_cited"


def test_teacher_contract_at_the_recipe_options() -> None:
    """The recipe's options ({difficulty: easy}) are the env's defaults: one run covers both.

    At medium and hard the teacher is below its bounds by design (draft notes and two hops), so the
    contract is checked at the options a report of this recipe uses.
    """
    options = load_config(RECIPE).env.options
    assert options == {"difficulty": "easy"} and DocSearchQAEnv().difficulty == "easy"
    assert_teacher_contract(
        lambda: DocSearchQAEnv(**options),
        f"rltk.plugins.make_env('doc_search_qa', {dict(options)!r})",
        n=200,
        valid_format=lambda outcome: outcome["answered"] and outcome["parsed"],
    )


@pytest.mark.parametrize(
    ("difficulty", "tool_calling"), [("easy", "native"), ("medium", "text"), ("hard", "text")]
)
def test_teacher_errs_only_in_its_slices_and_never_raises(difficulty: str, tool_calling: str) -> None:
    env = DocSearchQAEnv(difficulty=difficulty, tool_calling=tool_calling)
    teacher = env.teacher()
    first = env.tasks("eval", 1)[0].messages
    for junk in ([], ["junk"], [{"role": "user", "content": "hi"}], [*first, {"role": "assistant"}, {}]):
        assert teacher(junk) == "<answer>unknown [D01]</answer>"  # never raises, always in the format
    for task in env.tasks("eval", 40):
        episode = run_policy(env, task, teacher)
        assert episode.outcome["answered"] and episode.outcome["parsed"] and len(episode.actions) == 3
        assert episode.outcome["correct"] or teacher.in_weak_slice(task), task.info


def test_final_answer_reads_the_actions_not_the_reference(
    env: DocSearchQAEnv, eval_tasks: list[Task]
) -> None:
    for task, guarded in zip(eval_tasks[:30], guard_references(eval_tasks[:30]), strict=True):
        ref = task.reference
        actions = run_policy(env, task, env.oracle).actions
        key = (canon(ref["answer"]), ref["support"][0])
        assert env.final_answer(guarded.messages, actions) == key  # takes no task at all
        cite = int(ref["support"][0][1:])  # another writing of the same answer votes with it
        assert (
            env.final_answer([], [f"I read it. <answer> {ref['answer'].upper()}  [d{cite}]</answer>"]) == key
        )
    same = [f"<answer>{v} [D07]</answer>" for v in ("$1,249.00", "1249 USD", " $1249 ")]
    assert len({env.final_answer([], [a]) for a in same}) == 1
    assert env.final_answer([], ["<answer>$1,249 [D08]</answer>"]) != env.final_answer([], same[:1])
    for actions in (
        [],
        ["<tool>search: Nova Desk</tool>"],  # the episode ended without an answer
        ["$1,249 [D07]"],  # no answer tag
        ["<answer>$1,249</answer>"],  # no citation
        ["<answer>[D07]</answer>"],  # no value
        ["<answer>!! [D07]</answer>"],  # a value that normalizes to nothing
        ["<answer>$1,249 [D07] [D08]</answer>"],
        ["<answer>$1,249 [D07]</answer><answer>$1,299 [D08]</answer>"],
        ["<answer>$1,249 [D07]"],  # unclosed
    ):
        assert env.final_answer([], actions) is None, actions
    native = DocSearchQAEnv(tool_calling="native")
    assert native.final_answer([], ["<answer>$1,249 [D07]</answer>"]) == (canon("$1,249"), "D07")
    both = '<tool_call>{"name": "read", "arguments": {"doc_id": "D07"}}</tool_call><answer>$1 [D07]</answer>'
    assert native.final_answer([], [both]) is None  # the env saw no answer in that turn either
