"""The reasoning_gym env: reasoning-gym's own scoring on real completions, oracle, splits, options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

rg = pytest.importorskip(
    "reasoning_gym", reason="the reasoning_gym env needs reasoning-gym: pip install 'rltk[reasoning]'"
)

from conftest import tiny_overrides  # noqa: E402
from env_contract import assert_deterministic, assert_splits_disjoint  # noqa: E402
from reasoning_gym.utils import extract_answer  # noqa: E402
from rltk_envs.reasoning_gym import ReasoningGymEnv, dataset_seed  # noqa: E402
from rltk_rewards.reasoning import dataset_of, reasoning_gym_score  # noqa: E402
from transformers import PreTrainedTokenizerBase  # noqa: E402

from rltk.config import load_config  # noqa: E402
from rltk.env import run_policy  # noqa: E402
from rltk.plugins import PluginError, get_env, get_reward, make_env  # noqa: E402
from rltk.trainer import Trainer  # noqa: E402
from rltk.warmstart import demonstration_group  # noqa: E402

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "reasoning_gym_grpo.yaml"
FIXTURE = Path(__file__).parent / "data" / "reasoning_gym_completions.json"
# Generators with different scorers: exact/containment (default), decimal, per-character, list, set, cipher.
ORACLE_TASKS = [
    "leg_counting",
    "basic_arithmetic",
    "chain_sum",
    "spell_backward",
    "word_sorting",
    "number_sorting",
    "caesar_cipher",
    "group_anagrams",
]


_THEIR_DATASETS: dict[tuple, object] = {}  # built here, apart from rltk's own cache


def rg_eval_score(task: str, config: dict, seed: int, size: int, index: int, completion: str) -> float:
    """reasoning-gym's own evaluation of one completion (eval/eval.py): its own dataset, the entry at
    ``index``, ``extract_answer``, ``score_answer``; an exception scores 0."""
    key = (task, json.dumps(config, sort_keys=True), seed, size)
    if key not in _THEIR_DATASETS:
        _THEIR_DATASETS[key] = rg.create_dataset(task, seed=seed, size=size, **config)
    dataset = _THEIR_DATASETS[key]
    try:
        return dataset.score_answer(answer=extract_answer(completion), entry=dataset[index])
    except Exception:
        return 0.0


def test_registered_under_its_names() -> None:
    assert get_env("reasoning_gym") is ReasoningGymEnv
    assert get_reward("reasoning_gym_score") is reasoning_gym_score
    assert ReasoningGymEnv.default_rewards == {"reasoning_gym_score": 1.0}


@pytest.mark.parametrize("task", ORACLE_TASKS)
def test_oracle_goes_through_extraction_and_scores_one(task: str, tokenizer: PreTrainedTokenizerBase) -> None:
    env = ReasoningGymEnv(task=task)
    for split in ("eval", "train"):
        for t in env.tasks(split, 100):
            answer = env.oracle(t.messages)
            outcome = run_policy(env, t, env.oracle).outcome
            assert (
                outcome["answer"] == str(t.reference["entry"]["answer"]).strip()
            )  # extract_answer's reading
            assert outcome["score"] == 1.0 and outcome["correct"] is True, (t.id, answer, outcome)
            assert reasoning_gym_score(answer, t.reference, outcome) == 1.0
            args = (task, {}, t.reference["seed"], env.size, t.reference["index"], answer)
            assert rg_eval_score(*args) == 1.0
            assert len(tokenizer(answer)["input_ids"]) <= env.max_new_tokens
    group = demonstration_group(tokenizer, env, env.tasks("train", 1)[0])  # the warm start's demonstration
    assert tokenizer.decode(group.rollouts[0].token_ids).startswith("<answer>")


def test_oracle_answers_only_prompts_it_generated() -> None:
    env = ReasoningGymEnv(task="leg_counting")
    with pytest.raises(ValueError, match="answers only prompts this env generated"):
        env.oracle(env.messages("How many legs does a cat have?"))


def test_real_completions_score_exactly_as_reasoning_gym() -> None:
    """200 completions of SmolLM2-135M (each also wrapped in answer tags) plus 100 perturbations of the gold
    answers (scripts/reasoning_gym_completions.py): rltk's verdict and reward equal reasoning-gym's own
    evaluation on every one, and the scores cover 0, partial credit and 1."""
    assert FIXTURE.stat().st_size < 500_000
    data = json.loads(FIXTURE.read_text())
    assert data["meta"]["reasoning_gym"] == "0.1.25"
    records = data["records"]
    assert sum(r["kind"] == "model" for r in records) == 200
    envs: dict[str, ReasoningGymEnv] = {}
    tasks: dict[str, object] = {}
    scores = []
    for r in records:
        key = json.dumps(r["options"], sort_keys=True)
        if key not in envs:
            envs[key] = ReasoningGymEnv(**r["options"])
            tasks.update({t.id: t for t in envs[key].tasks("eval", 50)})
        env, task = envs[key], tasks[r["id"]]
        entry = task.reference["entry"]
        assert (entry["question"], entry["answer"]) == (r["question"], r["answer"]), "the generator changed"
        verdict = env.check(task, r["completion"])
        opts = r["options"]
        theirs = rg_eval_score(opts["task"], {}, r["seed"], env.size, r["index"], r["completion"])
        assert verdict["score"] == theirs == r["score"], r
        assert reasoning_gym_score(r["completion"], task.reference, verdict) == theirs
        assert verdict["correct"] is (theirs == 1.0)
        assert verdict["answer"] == extract_answer(r["completion"])
        scores.append(theirs)
        if r["kind"] == "model":  # the model never tags its answer in 64 tokens: score its text tagged too
            tagged = f"<answer>{r['completion']}</answer>"
            theirs = rg_eval_score(opts["task"], {}, r["seed"], env.size, r["index"], tagged)
            assert (
                env.check(task, tagged)["score"] == theirs == reasoning_gym_score(tagged, task.reference, {})
            )
            scores.append(theirs)
    assert any(s == 0 for s in scores) and any(s == 1 for s in scores) and any(0 < s < 1 for s in scores)


def test_a_scorer_that_raises_scores_zero_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    env = ReasoningGymEnv(task="chain_sum")
    task = env.tasks("eval", 1)[0]
    for junk in ["", "<answer>", "<answer></answer>", "<answer>\x00∞</answer>" * 500, "</answer><answer>"]:
        verdict = env.check(task, junk)
        assert verdict["correct"] is False and 0.0 <= verdict["score"] < 1.0

    def boom(self: object, answer: object, entry: object) -> float:
        raise RuntimeError("bad answer")

    monkeypatch.setattr(type(dataset_of(task.reference)), "score_answer", boom)
    verdict = env.check(task, env.oracle(task.messages))
    assert verdict["score"] == 0.0 and verdict["correct"] is False
    assert verdict["error"] == "RuntimeError: bad answer"


def test_splits_never_overlap() -> None:
    assert_splits_disjoint(ReasoningGymEnv(task="leg_counting"), (2000, 200, 200))


def test_splits_stay_disjoint_when_the_generator_repeats_itself() -> None:
    """One animal kind, 1-2 of it: a few dozen distinct questions; each lands in one split, once."""
    config = {"min_animals": 1, "max_animals": 1, "max_instances": 2}
    env = ReasoningGymEnv(task="leg_counting", config=config, size=3000)
    assert_splits_disjoint(env, (20, 2, 2))
    with pytest.raises(ValueError, match=r"raise env\.options\.size or ask for fewer"):
        env.tasks("eval", 200)


def test_deterministic_and_eval_is_the_seed_dataset_others_build() -> None:
    assert_deterministic(lambda: ReasoningGymEnv(task="basic_arithmetic"))
    env = ReasoningGymEnv(task="leg_counting", seed=42)
    theirs = rg.create_dataset("leg_counting", seed=42, size=500)  # reasoning-gym's eval default size
    for t in env.tasks("eval", 20) + env.tasks("test", 20):
        index = t.reference["index"]
        assert t.reference["seed"] == 42 and t.id.endswith(f"/42/{index}")
        assert t.reference["entry"] == theirs[index]
        assert t.messages == [
            {"role": "system", "content": rg.utils.SYSTEM_PROMPTS["default"]},
            {"role": "user", "content": theirs[index]["question"]},
        ]
    assert {t.reference["seed"] for t in env.tasks("train", 5, seed=1)} == {dataset_seed(42, 1)}


def test_tasks_are_the_same_in_another_process() -> None:
    """Generators must not depend on the hash seed (set iteration), or a fixture would drift across runs."""
    code = (
        "import json\nfrom rltk_envs.reasoning_gym import ReasoningGymEnv\n"
        "out = {k: [[t.id, t.messages] for t in ReasoningGymEnv(task=k).tasks('eval', 50)]\n"
        "       for k in ('leg_counting', 'basic_arithmetic', 'chain_sum', 'spell_backward')}\n"
        "print(json.dumps(out))"
    )
    runs = [
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1]


def test_options_are_checked_with_the_fix_named() -> None:
    cases = [
        ({"task": "leg_count"}, "did you mean 'leg_counting'"),
        ({}, "needs option task"),
        ({"task": "leg_counting", "config": {"min_animal": 2}}, "did you mean 'min_animals'"),
        ({"task": "leg_counting", "config": {"min_animals": 5, "max_animals": 2}}, "rejected config"),
        ({"task": "leg_counting", "config": {"seed": 3}}, "set seed as env.options.seed"),
        ({"task": "leg_counting", "system_prompt": "cot"}, "system_prompt must be one of"),
        ({"task": "leg_counting", "size": 0}, "size must be an integer"),
        ({"task": "leg_counting", "difficulty": "hard"}, "unknown options"),
    ]
    for options, message in cases:
        with pytest.raises(PluginError, match=message):
            make_env("reasoning_gym", options)


def test_final_answer_and_baselines() -> None:
    env = ReasoningGymEnv(task="leg_counting")
    tasks = env.tasks("eval", 50)
    assert env.final_answer(tasks[0].messages, ["so <answer>4</answer> or <answer> 6 </answer>"]) == "6"
    assert env.final_answer(tasks[0].messages, ["no tags"]) is None
    assert env.final_answer(tasks[0].messages, ["<answer></answer>"]) is None
    for name, policy in env.baselines().items():
        accuracy = sum(run_policy(env, t, policy).outcome["correct"] for t in tasks) / len(tasks)
        assert accuracy < 0.1, name


def test_recipe_trains_two_steps(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path), "rollout.max_new_tokens=8"]
    cfg = load_config(RECIPE, overrides)
    assert cfg.env.name == "reasoning_gym" and cfg.env.options["task"] == "leg_counting"
    Trainer(cfg).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["reward/reasoning_gym_score/failed"] == 0 for r in rows)  # scored in worker processes
    recipe = load_config(RECIPE, [])
    assert recipe.model.name == "smollm2-135m-instruct" and recipe.rewards[0].name == "reasoning_gym_score"
