"""The reward contract (issue 16): per-sample and TRL batch rewards, detected from the signature and checked
at config validation; TRL's documented rewards unchanged; format text vs messages; declared metadata;
``rltk rewards check`` and its flags; ``rltk rewards new`` installed into a fresh venv and trained with."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides
from contract_plugins import BoxedSumEnv

from rltk import plugins
from rltk.batch import Group, Rollout
from rltk.cli import main
from rltk.reward import Rubric, RubricItem
from rltk.reward_contract import contract_problems, form_of, make_contract
from rltk.rewardcheck import check_reward
from rltk.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
ENV = BoxedSumEnv()
BOXED_ENV = "env.name=contract_plugins:BoxedSumEnv"
EX1, EX11 = "trl_doc_rewards.example1:reward_func", "trl_doc_rewards.example1_1:reward_func"
EX2, EX3 = "trl_doc_rewards.example2:format_reward_func", "trl_doc_rewards.example3:reward_func"
EX5, THINK = "trl_doc_rewards.example5:async_reward_func", "trl.rewards:think_format_reward"
_EMPTY = torch.zeros(0, dtype=torch.long)


def groups_of(answers: list[list[str]], ids: list[list[int]] | None = None) -> list[Group]:
    """One group per answer row, on BoxedSumEnv's first tasks, judged by the env; optional model token ids."""
    tasks = ENV.tasks("eval", len(answers))
    out = []
    for i, (task, row) in enumerate(zip(tasks, answers, strict=True)):
        rollouts = []
        for j, a in enumerate(row):
            tok = torch.tensor(ids[i][j] if ids else [], dtype=torch.long)
            mask = torch.ones_like(tok)
            rollouts.append(Rollout(task, [a], tok, mask, mask.float(), outcome=ENV.check(task, a)))
        out.append(Group(task, _EMPTY, rollouts))
    return out


def scores(groups: list[Group], name: str) -> list[list[Any]]:
    return [[r.scores.get(name) for r in g.rollouts] for g in groups]


def score_with(name: str, groups: list[Group], workers: int = 0, **item: Any) -> dict[str, float]:
    rubric = Rubric([RubricItem(name, plugins.get_reward(name), **item)], timeout_s=5.0, workers=workers)
    try:
        return rubric.score(groups)
    finally:
        rubric.close()


def test_form_is_read_from_the_signature() -> None:
    assert form_of(plugins.get_reward("flag_decision")) == "sample"
    assert form_of(plugins.get_reward("contract_plugins:nonempty")) == "sample"
    for name in (EX1, EX11, EX2, EX3, EX5, THINK):
        assert form_of(plugins.get_reward(name)) == "batch", name
    legacy = make_contract(lambda c, r, o: 1.0, {})  # the old positional contract, other names
    assert (legacy.form, legacy.positional) == ("sample", ("reference", "outcome"))
    kw = make_contract(plugins.get_reward("contract_plugins:reads_prompt"), {"scale": 2.0})
    assert kw.positional == () and set(kw.keywords) == {"prompt", "outcome"}


@pytest.mark.parametrize("workers", [0, 2])
def test_per_sample_rewards_with_keywords(workers: int) -> None:
    oracle = [ENV.oracle(t.messages) for t in ENV.tasks("eval", 2)]
    groups = groups_of([[oracle[0], "", "\\boxed{999}"], [oracle[1], "What is 1 + 2?", "x"]])
    score_with("contract_plugins:nonempty", groups, workers)  # def r(completion, **_)
    assert scores(groups, "contract_plugins:nonempty") == [[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    score_with("contract_plugins:by_reference", groups, workers)  # takes no outcome
    assert scores(groups, "contract_plugins:by_reference") == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    score_with("contract_plugins:reads_prompt", groups, workers, params={"scale": 0.5})
    assert scores(groups, "contract_plugins:reads_prompt") == [[0.5, 0.0, 0.0], [0.5, 0.0, 0.0]]
    assert not any(r.failed for g in groups for r in g.rollouts)


@pytest.mark.parametrize("workers", [0, 2])
def test_trl_documented_rewards_work_unchanged(workers: int) -> None:
    """TRL's docs examples (tests/trl_doc_rewards, copied as published) and trl.rewards, by import path."""
    oracle = ENV.oracle(ENV.tasks("eval", 1)[0].messages)
    think = "<think>3 and 4</think><answer>7</answer>"
    groups = groups_of([[oracle, "", "\\boxed{1000}", think]], ids=[[[5, 6, 7], [], [8], [1, 2]]])
    score_with(EX1, groups, workers)  # completion_ids: the model's tokens
    assert scores(groups, EX1) == [[3.0, 0.0, 1.0, 2.0]]
    score_with(EX11, groups, workers)  # characters of a text completion
    assert scores(groups, EX11) == [[float(len(oracle)), 0.0, 12.0, float(len(think))]]
    score_with(EX3, groups, workers)  # the reference field ground_truth as a column
    assert scores(groups, EX3) == [[1.0, 0.0, 0.0, 0.0]]
    score_with(EX2, groups, workers, format="messages")  # written for the conversational format
    assert scores(groups, EX2) == [[0.0, 0.0, 0.0, 1.0]]
    score_with(EX5, groups, workers)  # async def
    assert scores(groups, EX5) == [[1.0, 0.0, 1.0, 1.0]]
    score_with(THINK, groups, workers, format="messages")
    assert scores(groups, THINK) == [[0.0, 0.0, 0.0, 1.0]]
    m = score_with(EX2, groups, workers, format="text")  # the wrong format: loud here (a TypeError)
    assert m[f"reward/{EX2}/errors"] == 4 and "TypeError" in groups[0].rollouts[0].failures[0].detail


def test_batch_rewards_none_params_and_bugs_per_group() -> None:
    groups = groups_of([["a", "b"], ["c"]])
    groups[1].task.messages[-1]["content"] = ""  # an empty prompt: this reward's "not applicable"
    m = score_with("contract_plugins:batch_with_params", groups, params={"bonus": 0.25})
    assert scores(groups, "contract_plugins:batch_with_params") == [[0.25, 0.25], [None]]
    assert m["reward/contract_plugins:batch_with_params/not_applicable"] == 1
    groups = groups_of([["a", "b", "c"], ["d"]])
    score_with("contract_plugins:batch_wrong_length", groups)  # 2 scores for 3: that group fails
    failed = [[r.failures[0].kind if r.failed else None for r in g.rollouts] for g in groups]
    assert failed == [["invalid"] * 3, [None]]
    assert "returned 2 scores for 3 completions" in groups[0].rollouts[0].failures[0].detail
    groups = groups_of([["x", " ", "y"]])
    score_with("contract_plugins:batch_bad_entry", groups)  # a bad entry fails its rollout only
    assert [r.failed for r in groups[0].rollouts] == [False, True, False]


@pytest.mark.parametrize("how", ["raise", "hang"])
def test_a_batch_call_that_fails_fails_its_group_only(how: str) -> None:
    tasks = ENV.tasks("eval", 8)
    odd = [int(t.reference["ground_truth"]) % 2 == 1 for t in tasks]
    assert any(odd) and not all(odd)
    groups = groups_of([["a", "b"]] * 8)
    name = "contract_plugins:batch_fails_on_odd"
    rubric = Rubric(
        [RubricItem(name, plugins.get_reward(name), params={"how": how})], timeout_s=0.5, workers=2
    )
    try:
        rubric.score(groups)
    finally:
        rubric.close()
    kind = "raised" if how == "raise" else "timeout"
    for g, is_odd in zip(groups, odd, strict=True):
        assert [f.kind for r in g.rollouts for f in r.failures] == ([kind] * 2 if is_odd else [])
        assert all(math.isnan(r.reward) for r in g.rollouts) == is_odd


def test_format_text_vs_messages() -> None:
    groups = groups_of([["a", "ab", "a much longer answer"]])
    score_with("contract_plugins:messages_len", groups, format="messages")
    assert scores(groups, "contract_plugins:messages_len") == [[1.0, 1.0, 1.0]]  # one message each
    score_with("contract_plugins:messages_len", groups, format="text")
    assert scores(groups, "contract_plugins:messages_len") == [[1.0, 0.0, 0.0]]  # len() of the text
    fn = plugins.get_reward("contract_plugins:nonempty")
    assert make_contract(fn, {}).format == "text"  # the default
    fn.reward_format = "messages"  # as @reward_fn(format="messages") declares it
    try:
        assert make_contract(fn, {}).format == "messages" and make_contract(fn, {}, "text").format == "text"
    finally:
        fn.reward_format = None


def test_signature_problems_name_the_fix() -> None:
    wrong = plugins.get_reward("contract_plugins:wrong_signature")
    assert contract_problems(wrong, {"threshold": 3}) == []
    [(param, why, fix)] = contract_problems(wrong, {})
    assert param == "threshold" and "gets no value" in why and "set rewards.N.params.threshold" in fix
    column = plugins.get_reward("contract_plugins:wrong_column")
    [(_, why, fix)] = contract_problems(column, {}, columns={"ground_truth"})
    assert "no reference field 'solution'" in why and "ground_truth" in fix
    assert contract_problems(column, {"solution": "4"}, columns={"ground_truth"}) == []
    [(_, why, fix)] = contract_problems(lambda: 1.0, {})
    assert "fn(completion, reference, outcome, **params)" in fix and "fn(prompts, completions" in fix
    [(param, why, _)] = contract_problems(plugins.get_reward("contract_plugins:nonempty"), {"outcome": 1})
    assert param == "outcome" and "rltk passes" in why


def test_a_param_is_never_filled_by_position_with_the_reference_or_the_outcome() -> None:
    def needs_reference(completion, reference, tolerance):  # type: ignore[no-untyped-def]
        return 1.0

    def probe_second(completion, tolerance):  # type: ignore[no-untyped-def]
        return 1.0

    for fn in (needs_reference, probe_second):
        [(param, why, _)] = contract_problems(fn, {})
        assert param == "tolerance" and "gets no value" in why, fn
        assert contract_problems(fn, {"tolerance": 0.1}) == []
    assert make_contract(needs_reference, {"tolerance": 0.1}).positional == ("reference",)
    assert make_contract(lambda c, r, o: 1.0, {}).positional == ("reference", "outcome")  # the old triple
    assert make_contract(lambda c, r, o, tolerance: 1.0, {"tolerance": 1}).positional == (
        "reference",
        "outcome",
    )


def test_a_misspelled_param_of_a_kwargs_reward_is_caught() -> None:
    def length_penalty(completions, max_chars=12, **kwargs):  # type: ignore[no-untyped-def]
        return [0.0 for _ in completions]

    [(param, why, fix)] = contract_problems(length_penalty, {"max_char": 10})
    assert param == "max_char" and "kwargs" in why and "did you mean 'max_chars'" in fix
    assert contract_problems(length_penalty, {"max_chars": 10, "ground_truth_weight": 2}) == []  # kwargs use


def test_a_wrong_signature_fails_at_validation_exit_2(tmp_path: Path) -> None:
    rewards = (
        "rewards=[{name: 'contract_plugins:wrong_signature'}, {name: 'contract_plugins:wrong_column'}, "
        "{name: 'contract_plugins:batch_with_params', params: {bonsu: 1}}, "
        f"{{name: 'contract_plugins:nonempty'}}, {{name: '{EX3}'}}]"
    )
    cmd = [sys.executable, "-m", "rltk.train", RECIPE, BOXED_ENV, rewards, "model.name=no/such-model"]
    cmd.append(f"run.output_dir={tmp_path / 'run'}")
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "invalid config" in out.stderr and "3 problems" in out.stderr
    assert "rewards.0: 'contract_plugins:wrong_signature'" in out.stderr
    assert "set rewards.0.params.threshold, or give it a default" in out.stderr
    assert (
        "no reference field 'solution'" in out.stderr
        and "its reference fields are: ground_truth" in out.stderr
    )
    assert "rewards.2.params.bonsu: 1 (not a parameter of reward" in out.stderr and "'bonus'" in out.stderr
    assert not (tmp_path / "run").exists()  # stopped before anything ran (the model does not even exist)


def test_trl_rewards_by_name_in_a_tiny_run(tiny_model_dir: str, tmp_path: Path) -> None:
    rewards = (
        f"rewards=[{{name: '{EX3}'}}, {{name: '{EX2}', format: messages}}, "
        f"{{name: '{THINK}', format: messages}}, {{name: '{EX11}', weight: 0.01}}, "
        "{name: 'contract_plugins:nonempty'}]"
    )
    assert train_main([RECIPE, *tiny_overrides(tiny_model_dir, tmp_path), BOXED_ENV, rewards]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for name in (EX3, EX2, THINK, EX11, "contract_plugins:nonempty"):
        assert all(r[f"reward/{name}/failed"] == 0 and f"reward/{name}/mean" in r for r in rows), name
    assert any(r[f"reward/{EX11}/mean"] > 0 for r in rows)  # it scored real completions


def test_rewards_list_shows_form_range_version_description(capsys: pytest.CaptureFixture[str]) -> None:
    plugins.register_reward(plugins.get_reward("contract_plugins:nonempty"), "test_nonempty")
    plugins.register_reward(plugins.get_reward(EX3), "test_trl_boxed")
    try:
        assert main(["rewards", "list"]) == 0
    finally:
        del plugins._REGISTRY["reward"]["test_nonempty"], plugins._REGISTRY["reward"]["test_trl_boxed"]
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert lines["name"][:5] == ["name", "form", "format", "range", "version"]
    assert lines["test_nonempty"][1:6] == ["sample", "text", "[0,", "1]", "2.0"]
    assert " ".join(lines["test_nonempty"][6:]) == "The completion is non-empty (keywords only)."
    assert lines["test_trl_boxed"][1:5] == ["batch", "text", "-", "-"]
    assert lines["flag_decision"][3:5] == ["[-1,", "1]*"]  # a range that follows the params


def test_rewards_list_into_a_closed_pipe_is_quiet() -> None:
    out = subprocess.run(
        f"{sys.executable} -m rltk.cli rewards list | head -1",
        shell=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.stdout.startswith("name") and out.stderr == ""


def test_rewards_check_prints_every_source_and_passes_a_good_reward(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["rewards", "check", "flag_decision", "--env", "policy_flagging", "--n", "20"]) == 0
    out = capsys.readouterr().out
    assert "per-sample, format text, range [-1, 1]" in out and "ms/call" in out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.startswith(("oracle", "teacher", "canary"))
    }
    names = [
        "empty",
        "whitespace",
        "echo_prompt",
        "echo_system",
        "padded",
        "repeated",
        "hedge",
        "wrong_answer",
    ]
    assert list(rows) == ["oracle", "teacher", *(f"canary:{n}" for n in names)]
    assert rows["oracle"][1:7] == ["20", "0", "0", "1.000", "1.000", "1.000"]  # scored, n/a, failed, mean..
    assert float(rows["teacher"][4]) < 1.0 and rows["canary:wrong_answer"][4] == "-1.000"
    assert "ok: the oracle scores above the wrong answer and no canary does" in out


def test_rewards_check_flags(capsys: pytest.CaptureFixture[str]) -> None:
    env = BoxedSumEnv()
    text_reward_as_messages = check_reward(EX11, env, format="messages", n=10)  # len() of [message] = 1
    assert any(f.startswith("no signal: it scores every answer 1") for f in text_reward_as_messages.flags)
    assert check_reward(EX11, env, format="text", n=10).flags != text_reward_as_messages.flags
    hackable = check_reward("contract_plugins:keyword_hit", env, n=10).flags
    for canary in ("padded", "repeated", "hedge"):
        assert any(
            f.startswith(f"canary:{canary} scores above the well-formed wrong answer on 10/10")
            for f in hackable
        )
    assert not any("echo" in f or "empty" in f for f in hackable)
    buggy = check_reward("contract_plugins:batch_bad_entry", env, n=10).flags
    assert any(f.startswith("canary:empty: 10 answers failed") for f in buggy)
    assert check_reward(EX3, env, n=10).flags != []  # TRL's own example rewards a hedge
    args = [
        "rewards",
        "check",
        "contract_plugins:keyword_hit",
        "--env",
        "contract_plugins:BoxedSumEnv",
        "--n",
        "5",
    ]
    assert main(args) == 1 and "FLAGGED (3)" in capsys.readouterr().out
    args = ["rewards", "check", "contract_plugins:wrong_column", "--env", "contract_plugins:BoxedSumEnv"]
    assert main(args) == 2 and "no reference field 'solution'" in capsys.readouterr().err


def _fresh_venv(path: Path) -> Path:
    """A new venv that sees this one's packages (torch, rltk, pip, setuptools) through a .pth file, as
    ``--system-site-packages`` would see a system install: nothing is downloaded."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(path)], check=True
    )
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    here = sysconfig.get_paths()["purelib"]
    Path(purelib, "parent_venv.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    return python


def test_rewards_new_installs_lists_checks_tests_and_trains(tmp_path: Path) -> None:
    """Acceptance: rewards new → pip install -e in a fresh venv → listed → check → its test → 2 tiny steps."""
    assert main(["rewards", "new", "acme_test", "--dir", str(tmp_path)]) == 0
    root = tmp_path / "acme_test"
    python = _fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str, cwd: Path = root) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(python), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
        )

    pip = run("-m", "pip", "install", "-q", "--no-build-isolation", "--no-index", "-e", str(root))
    assert pip.returncode == 0, pip.stderr
    listed = run("-m", "rltk.cli", "rewards", "list")
    assert listed.returncode == 0 and any(
        line.split()[:5] == ["acme_test", "sample", "text", "[0,", "1]"] and "0.1.0" in line
        for line in listed.stdout.splitlines()
    ), listed.stdout
    checked = run("-m", "rltk.cli", "rewards", "check", "acme_test", "--env", "policy_flagging", "--n", "20")
    assert checked.returncode == 0 and "ok: the oracle scores above" in checked.stdout, checked.stdout
    tested = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests")
    assert tested.returncode == 0 and "3 passed" in tested.stdout, tested.stdout + tested.stderr
    trained = run(
        "-m", "rltk.cli", "train", "recipes/acme_test_grpo.yaml", f"run.output_dir={tmp_path / 'run'}"
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["reward/acme_test/failed"] == 0 for r in rows)
    assert run("-c", "import rltk_rewards").returncode == 0  # the fresh venv sees rltk's own plugins too


def test_rewards_new_refuses_a_taken_or_bad_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rewards", "new", "flag_decision", "--dir", str(tmp_path)]) == 2
    assert "already installed" in capsys.readouterr().err
    assert main(["rewards", "new", "Bad-Name", "--dir", str(tmp_path)]) == 2
    assert "lowercase Python identifier" in capsys.readouterr().err
    assert main(["rewards", "check", "flag_decision"]) == 2  # no --env
    assert not list(tmp_path.iterdir())


def test_the_readme_reward_examples_run_as_written() -> None:
    """README's "Write a reward": its two python blocks, run as written, then scored through a rubric."""
    readme = (REPO / "README.md").read_text()
    if "## Write a reward" not in readme:
        pytest.skip("README.md has no 'Write a reward' section")
    section = readme.split("## Write a reward")[1].split("\n## ")[0]
    namespace: dict[str, Any] = {}
    for block in section.split("```python\n")[1:3]:
        exec(compile(block.split("```")[0], "README.md", "exec"), namespace)
    iban, boxed = namespace["iban_valid"], namespace["reward_func"]
    assert form_of(iban) == "sample" and form_of(boxed) == "batch"
    assert contract_problems(iban, {"max_chars": 34}) == []
    assert contract_problems(boxed, {}, columns={"ground_truth"}) == []
    groups = groups_of([[ENV.oracle(ENV.tasks("eval", 1)[0].messages), "GB82 WEST 1234 5698 7654 32"]])
    rubric = Rubric(
        [RubricItem("iban", iban, params={"max_chars": 34}), RubricItem("boxed", boxed)], workers=0
    )
    rubric.score(groups)
    assert [r.scores for r in groups[0].rollouts] == [
        {"iban": 0.0, "boxed": 1.0},
        {"iban": 1.0, "boxed": 0.0},
    ]
