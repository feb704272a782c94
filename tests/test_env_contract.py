"""The env contract: typed verdicts, contract errors (exit 2), ``rltk envs check``, ``rltk envs new``."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rltk.cli import main
from rltk.contract import EnvContractError, EnvContractWarning, Outcome, warn_if_no_answers
from rltk.envcheck import format_results, run_checks
from rltk.plugins import PluginError, get_env, list_envs, make_env
from rltk.scaffold_env import FILES, SUMMARY, render, write_package

ROOT = Path(__file__).resolve().parents[1]
TESTS = str(Path(__file__).resolve().parent)
SHIPPED = ["policy_flagging", "invoice_extraction", "sql_analytics", "support_refund", "doc_search_qa"]


def rows(name: str, n: int = 40) -> dict[str, tuple[str, str, str]]:
    """``rltk envs check`` of ``broken_envs:<name>``: check name → (status, detail, fix)."""
    results = run_checks(f"broken_envs:{name}", {}, n)
    return {r.name: (r.status, r.detail, r.fix) for r in results}


def test_a_kept_contract_passes_every_check() -> None:
    for name in ("ParityEnv", "TypedOutcomeEnv"):
        results = run_checks(f"broken_envs:{name}", {}, 60)
        assert all(r.status == "pass" for r in results), format_results(name, results)


def test_check_without_correct_fails_naming_the_fix() -> None:
    status, detail, fix = rows("NoCorrectEnv")["oracle"]
    assert status == "fail" and "without 'correct'" in detail and "score 0%" in detail
    assert "Outcome(correct=" in fix


def test_check_returning_a_float_fails() -> None:
    status, detail, fix = rows("FloatCheckEnv")["oracle"]
    assert status == "fail" and "returned 1.0 (float), not a verdict" in detail and "Outcome" in fix


def test_oracle_returning_none_fails() -> None:
    status, detail, fix = rows("NoneOracleEnv")["oracle"]
    assert status == "fail" and "returned None (NoneType)" in detail and "returns a str" in fix


def test_default_rewards_as_a_list_fails_and_make_env_refuses_it() -> None:
    status, detail, fix = rows("ListRewardsEnv")["default_rewards"]
    assert status == "fail" and "default_rewards is a list" in detail and "{'my_reward': 1.0}" in fix
    with pytest.raises(EnvContractError, match="default_rewards is a list"):
        make_env("broken_envs:ListRewardsEnv")


def test_no_description_fails_and_lists_with_the_fix() -> None:
    status, detail, fix = rows("NoDescriptionEnv")["description"]
    assert status == "fail" and "no description" in detail and "description =" in fix
    from rltk.plugins import register_env

    register_env(get_env("broken_envs:NoDescriptionEnv"), name="no_description_test")
    assert "set the env class's `description`" in list_envs()["no_description_test"]


def test_docstring_stands_in_for_a_missing_description() -> None:
    from rltk.contract import description_of

    cls = get_env("broken_envs:ParityEnv")
    documented = type("Documented", (cls,), {"__doc__": "First line.\nMore.", "description": None})
    assert description_of(documented) == "First line."
    assert description_of(get_env("broken_envs:NoDescriptionEnv")) == ""


def test_no_answer_warns_in_check_and_in_training() -> None:
    status, detail, fix = rows("NoAnswerEnv")["answer"]
    assert status == "warn" and "balance_answers would do nothing" in detail and "answer" in fix
    env = make_env("broken_envs:NoAnswerEnv")
    from rltk.env import run_policy

    episodes = [run_policy(env, t, lambda m: "maybe") for t in env.tasks("train", 4)]
    with pytest.warns(EnvContractWarning, match="balance_answers is on"):
        assert warn_if_no_answers(env, episodes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_no_answers(env, episodes)  # once per env
        parity = make_env(
            "broken_envs:TypedOutcomeEnv"
        )  # no sample parsed, but the oracle's verdict has answers
        assert not warn_if_no_answers(
            parity, [run_policy(parity, t, lambda m: "?") for t in parity.tasks("train", 4)]
        )


def test_overlapping_splits_fail() -> None:
    status, detail, _ = rows("OverlappingSplitsEnv")["splits"]
    assert status == "fail" and "hash into another split" in detail


def test_nondeterministic_tasks_fail() -> None:
    status, detail, fix = rows("NondeterministicEnv")["determinism"]
    assert status == "fail" and "a fresh env gave other eval tasks" in detail and "seed" in fix


def test_oracle_below_100_percent_fails() -> None:
    status, detail, _ = rows("WeakOracleEnv")["oracle"]
    assert status == "fail" and "/40 eval tasks correct" in detail and not detail.startswith("40/40")


def test_outcome_is_a_mapping_that_pickles_and_validates() -> None:
    o = Outcome.of("e", {"correct": True, "answer": None, "rule": "R1"})
    assert dict(o) == {"correct": True, "answer": None, "rule": "R1"} and o == dict(o)
    assert o.correct is True and o.answer is None and o["rule"] == "R1" and "cost" not in o
    assert pickle.loads(pickle.dumps(o)) == o
    assert "answer" not in Outcome(correct=False) and Outcome(False, answer="x")["answer"] == "x"
    for bad, match in (
        ({"correct": "yes"}, "not a bool"),
        ({"correct": True, "answer": []}, "hashable"),
        (None, "None"),
    ):
        with pytest.raises(EnvContractError, match=match):
            Outcome.of("e", bad)


def test_task_fields_of_the_wrong_type_are_contract_errors() -> None:
    from rltk.env import Task

    with pytest.raises(EnvContractError, match=r"env 'x': task 'x/1': messages is not a list.*reference"):
        Task("x/1", "eval", "hello", None)  # type: ignore[arg-type]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, str(ROOT)])}
    cmd = [sys.executable, "-m", "rltk.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


@pytest.mark.parametrize(
    "args",
    [
        ["envs", "check", "broken_envs:NoCorrectEnv", "--n", "20"],
        ["eval", "--policy", "oracle", "--env", "broken_envs:FloatCheckEnv", "--n", "5", "--no-baselines"],
        ["eval", "--policy", "oracle", "--env", "broken_envs:NoneOracleEnv", "--n", "5", "--no-baselines"],
        ["eval", "--policy", "oracle", "--env", "broken_envs:ListRewardsEnv", "--n", "5"],
    ],
)
def test_contract_failures_exit_2_without_a_traceback(args: list[str]) -> None:
    out = _cli(*args)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout
    text = out.stdout + out.stderr
    assert "→" in text or "fix:" in text  # the fix is named


def test_envs_list_into_a_closed_pipe_is_quiet() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, str(ROOT)])}
    cmd = f"{sys.executable} -m rltk.cli envs list | head -c 0"
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.stderr == "", out.stderr


def test_envs_list_reports_an_env_that_fails_to_load(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["envs", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in SHIPPED)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_envs_pass_envs_check(name: str) -> None:
    results = run_checks(name, {}, 200)
    assert not [r for r in results if r.status == "fail"], format_results(name, results)


def test_example_package_is_the_scaffold_for_its_name() -> None:
    example = ROOT / "examples" / "ticket_triage"
    assert render("ticket_triage") == FILES  # the example keeps its own summary
    assert SUMMARY in FILES["pyproject.toml"] and SUMMARY in FILES["ticket_triage/__init__.py"]
    for rel, text in FILES.items():
        assert (example / rel).read_text() == text, f"examples/ticket_triage/{rel} differs from the scaffold"


def test_a_misspelled_env_option_is_one_error_naming_the_valid_ones() -> None:
    with pytest.raises(PluginError, match=r"unknown option 'levl' \(did you mean 'level'\?\)"):
        run_checks("broken_envs:LeveledParityEnv", {"levl": "hard"}, 20)
    out = _cli("envs", "check", "broken_envs:LeveledParityEnv", "--env-options", '{"levl": "hard"}')
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert out.stderr.startswith("error: ") and "did you mean 'level'" in out.stderr
    assert "Traceback" not in out.stderr and "valid options: level" in out.stderr
    assert all(r.status == "pass" for r in run_checks("broken_envs:LeveledParityEnv", {"level": "hard"}, 40))


@pytest.mark.parametrize(
    ("name", "said"), [("MisdeclaredTeacherEnv", "0.0% of its"), ("UndeclaredTeacherEnv", "no weak_slices")]
)
def test_teacher_errors_outside_its_weak_slices_warn(name: str, said: str) -> None:
    results = run_checks(f"broken_envs:{name}", {}, 60)
    status, detail, fix = {r.name: (r.status, r.detail, r.fix) for r in results}["teacher"]
    assert status == "warn" and said in detail and "wrong on 100% of last_digit=7" in detail, detail
    assert "weak_slices = {info key: (values, ...)}" in fix and "Task.info" in fix
    assert not [r for r in results if r.status == "fail"]  # a warning: exit 0
    kept = rows("ParityEnv", 60)["teacher"]
    assert kept[0] == "pass" and "100.0% of its" in kept[1], kept


def test_check_raising_on_a_canary_names_the_contract() -> None:
    status, detail, fix = rows("RaisingCheckEnv")["canaries"]
    assert status == "fail" and "raised KeyError" in detail
    assert fix.startswith("check must never raise on model output: return Outcome(correct=False)")


@pytest.mark.parametrize(
    ("name", "longest"), [("LongAnswerEnv", "the number you"), ("MultiTurnLongEnv", "let me")]
)
def test_oracle_answers_longer_than_max_new_tokens_fail(name: str, longest: str) -> None:
    status, detail, fix = rows(name)["answer_length"]
    assert status == "fail" and "exceed max_new_tokens" in detail and longest in detail, detail
    assert "longest: parity/eval/0/" in detail and "raise max_new_tokens" in fix
    status, detail, _ = rows("ParityEnv")["answer_length"]
    assert status == "pass" and "of max_new_tokens 16" in detail


def test_scaffold_renames_everything_and_refuses_taken_names(tmp_path: Path) -> None:
    root = write_package("claims_triage", tmp_path)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert "claims_triage/env.py" in files and "recipes/claims_triage_grpo.yaml" in files
    text = "".join(p.read_text() for p in root.rglob("*") if p.is_file())
    assert "ticket_triage" not in text and "TicketTriage" not in text and "ClaimsTriageEnv" in text
    for rel in ("pyproject.toml", "claims_triage/__init__.py", "recipes/claims_triage_grpo.yaml"):
        prose = (root / rel).read_text()
        assert "ticket" not in prose.lower() and "route" not in prose, f"{rel} keeps ticket-triage prose"
    summary = "claims_triage: an rltk environment plugin (started from rltk envs new; describe your workflow"
    assert summary in (root / "pyproject.toml").read_text()
    assert summary in (root / "claims_triage" / "__init__.py").read_text()
    for bad in ("policy_flagging", "Bad-Name", "json", "class"):
        with pytest.raises(Exception, match="env"):
            write_package(bad, tmp_path / "x")


@pytest.mark.slow
@pytest.mark.ci  # the acceptance: CI runs it on a clean clone
def test_envs_new_installs_into_a_fresh_venv_and_trains(tmp_path: Path) -> None:
    """rltk envs new → pip install -e (fresh venv) → listed → envs check → its test → 2 tiny steps."""
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.base_prefix + "/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True
    )
    py = str(venv / "bin" / "python")
    site = subprocess.run(
        [py, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True
    )
    ours = subprocess.run(
        [sys.executable, "-c", "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))"],
        capture_output=True,
        text=True,
    )
    # torch, transformers, rltk (editable: its own .pth, hence addsitedir) come from this venv: no downloads
    Path(site.stdout.strip(), "rltk_parent.pth").write_text(
        f"import site; site.addsitedir({ours.stdout.strip()!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*cmd: str, cwd: Path = tmp_path, extra: dict | None = None) -> str:
        envs = {**env, **(extra or {})}
        out = subprocess.run(cmd, capture_output=True, text=True, env=envs, cwd=cwd, timeout=900, check=False)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    run(py, "-m", "rltk.cli", "envs", "new", "claims_triage", "--dir", str(tmp_path))
    pkg = tmp_path / "claims_triage"
    # offline: build with this venv's setuptools (the fresh venv's bundled one needs the wheel package)
    pip = ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e", str(pkg)]
    run(py, *pip, extra={"PYTHONPATH": ours.stdout.strip()})
    assert "claims_triage" in run(py, "-m", "rltk.cli", "envs", "list")
    assert "0 failed" in run(py, "-m", "rltk.cli", "envs", "check", "claims_triage")
    run(py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests"), cwd=pkg)
    recipe = str(pkg / "recipes" / "claims_triage_grpo.yaml")
    overrides = [f"run.output_dir={tmp_path / 'run'}", "run.steps=2", "eval.n=4", "rollout.reward_workers=0"]
    run(py, "-m", "rltk.cli", "train", recipe, *overrides)
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_an_env_default_reward_is_checked_at_validation_when_the_recipe_lists_none() -> None:
    from rltk.config import ConfigError, load_config
    from rltk.plugins import register_env, resolve

    base = get_env("policy_flagging")
    typo = type("DefaultRewardTypo", (base,), {"default_rewards": {"flag_decisoin": 1.0}})
    needs = type(
        "DefaultRewardNeeds", (base,), {"default_rewards": {"contract_plugins:wrong_signature": 1.0}}
    )
    register_env(typo, name="default_reward_typo")
    register_env(needs, name="default_reward_needs")
    recipe = str(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["env.name=default_reward_typo", "rewards=[]"], resolve=resolve)
    assert "env.default_rewards.flag_decisoin" in str(err.value) and "flag_decision" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["env.name=default_reward_needs", "rewards=[]"], resolve=resolve)
    assert "env.default_rewards.contract_plugins:wrong_signature" in str(err.value)
    load_config(recipe, ["rewards=[]"], resolve=resolve)  # policy_flagging's own defaults pass
