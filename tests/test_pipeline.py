"""One ``rltk train`` run stage by stage (rltk/pipeline.py): the report at its end, SFT-only runs of equal
wall time, and warm starts from the teacher's episodes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_overrides
from plugins_for_tests import CounterToolEnv

from rltk import plugins
from rltk.cli import main
from rltk.config import ConfigError, load_config
from rltk.env import run_policy
from rltk.pipeline import run
from rltk.sampler import HFSampler
from rltk.warmstart import demonstration_group, demonstrator, verified

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
REPORT = [
    "warmstart.enabled=true",
    "warmstart.steps=2",
    "eval.n=6",
    "eval.report.enabled=true",
    "eval.report.samples=2",
    "eval.report.bon=2",
    "eval.report.sampled_tasks=3",
]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_train_ends_with_the_report_and_records_its_wall_time(tiny_model_dir: str, tmp_path: Path) -> None:
    run(load_config(RECIPE, [*tiny_overrides(tiny_model_dir, tmp_path), *REPORT]))
    built = json.loads((tmp_path / "report" / "report.json").read_text())
    names = [p["name"] for p in built["policies"]]
    assert names[:5] == ["base", "after warm start", "final", "teacher", "oracle"]
    assert names[5].startswith("trivial: ") and len(names) == 6
    assert built["tasks"] == 6 and built["settings"]["sampled_tasks"] == 3
    assert all(p["best_of_n"]["n"] == 2 for p in built["policies"][:3])
    assert {d["a"] for d in built["differences"]} == {"final greedy"}
    assert (tmp_path / "report" / "report.png").read_bytes()[:4] == b"\x89PNG"
    stages = sorted(p.name for p in (tmp_path / "report" / "stages").iterdir())
    assert stages == ["after_warm_start.json", "base.json", "final.json"]
    times = json.loads((tmp_path / "train_time.json").read_text())
    assert times["rl_steps"] == 2 and times["rl_s"] > 0 and times["warmstart_s"] > 0
    assert times["total_s"] == pytest.approx(times["rl_s"] + times["warmstart_s"])
    rl = [r["time/step_s"] for r in _metrics(tmp_path) if "time/step_s" in r]
    assert times["rl_s"] == pytest.approx(sum(rl))  # RL steps only: evals and saves excluded


def test_a_resumed_run_keeps_the_stages_it_passed(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path), *REPORT]
    run(load_config(RECIPE, overrides))
    base = (tmp_path / "report" / "stages" / "base.json").read_text()
    run(load_config(RECIPE, [*overrides, "run.steps=3"]))  # resumes at step 2, trains one more step
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["policies"]
    assert [p["name"] for p in rows[:3]] == ["base", "after warm start", "final"]
    assert rows[2]["source"].endswith("@ step 3")  # the final model evaluated again after the new step
    assert (tmp_path / "report" / "stages" / "base.json").read_text() == base  # kept, not re-evaluated
    times = json.loads((tmp_path / "train_time.json").read_text())
    assert times["rl_steps"] == 3
    steps = [r["time/step_s"] for r in _metrics(tmp_path) if "time/step_s" in r]
    assert len(steps) == 3 and times["rl_s"] == pytest.approx(sum(steps))  # the first run's steps kept


def test_sft_only_trains_for_the_other_runs_wall_time(tiny_model_dir: str, tmp_path: Path) -> None:
    first, second = tmp_path / "rl", tmp_path / "sft"
    run(
        load_config(
            RECIPE, [*tiny_overrides(tiny_model_dir, first), "warmstart.enabled=true", "warmstart.steps=1"]
        )
    )
    budget = json.loads((first / "train_time.json").read_text())["total_s"]
    overrides = [*tiny_overrides(tiny_model_dir, second), "warmstart.enabled=true", "warmstart.steps=100000"]
    # it never samples: no vLLM engine starts (the python named has no vLLM: starting one would fail)
    overrides += ["rollout.backend=vllm", f"rollout.vllm_python={sys.executable}"]
    trainer = run(load_config(RECIPE, [*overrides, f"warmstart.equal_time_as={first}"]))
    assert isinstance(trainer.sampler, HFSampler)
    times = json.loads((second / "train_time.json").read_text())
    assert times["rl_steps"] == 0 and times["rl_s"] == 0
    assert budget <= times["warmstart_s"] < budget + 10  # stops at the first step past the budget
    rows = _metrics(second)
    warm = [r for r in rows if "warmstart/step" in r]
    assert len(warm) == 1 and 1 <= warm[0]["warmstart/step"] < 100000
    assert not [r for r in rows if r.get("step", 0) > 0]  # no RL step
    assert sorted(p.name for p in (second / "checkpoints").iterdir()) == ["step-000000"]


def test_sft_only_needs_a_finished_run(
    tiny_model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [*tiny_overrides(tiny_model_dir, tmp_path / "x"), f"warmstart.equal_time_as={tmp_path}"]
    assert main(["train", RECIPE, *args, "eval.report.samples=2"]) == 2  # bon 8 > samples 2 too
    err = capsys.readouterr().err
    assert "train_time.json is missing" in err and "eval.report.bon" in err and "warmstart.enabled" in err
    assert "Traceback" not in err


def test_teacher_demonstrations_are_the_teachers_episodes(tokenizer) -> None:
    env = plugins.make_env("support_refund", {"difficulty": "hard"})
    teacher = demonstrator(env, "teacher")
    differs = []
    for task in env.tasks("train", 8):
        turns = demonstration_group(tokenizer, env, task, teacher).rollouts[0].turns
        assert turns == run_policy(env, task, teacher).actions
        differs.append(turns != run_policy(env, task, env.oracle).actions)
    assert any(differs)  # the teacher errs on some of them: its logs, not the oracle's


def test_teacher_demos_for_an_env_without_a_teacher_exit_2(
    tiny_model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert CounterToolEnv().teacher() is None
    args = [
        *tiny_overrides(tiny_model_dir, tmp_path),
        "env.name=plugins_for_tests:CounterToolEnv",
        "rewards=[]",
        "warmstart.enabled=true",
        "warmstart.steps=1",
        "warmstart.demos=teacher",
    ]
    assert main(["train", RECIPE, *args]) == 2
    err = capsys.readouterr().err
    assert "ships no teacher" in err and "warmstart.demos=oracle" in err and "Traceback" not in err


def test_verified_only_keeps_the_demonstrations_the_env_verifies() -> None:
    env = plugins.make_env("invoice_extraction", {"difficulty": "easy"})
    tasks = env.tasks("train", 24)
    kept = verified(env, tasks, demonstrator(env, "teacher"), "teacher")
    # the teacher returns vendor null on every letterhead (plain) invoice and is right on the labelled ones
    assert [t.id for t in kept] == [t.id for t in tasks if t.info["layout"] != "plain"]
    assert 0 < len(kept) < len(tasks)
    with pytest.raises(ConfigError, match="verifies none of 24 teacher demonstrations") as caught:
        verified(env, tasks, lambda messages: "not json", "teacher")
    assert "warmstart.verified_only=false" in str(caught.value)
