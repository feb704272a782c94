"""The engine end to end on a tiny model: steps, metrics, checkpoints, SIGKILL + resume, warm start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sigkill_once_saved, tiny_overrides
from safetensors.torch import load_file

from rltk import evaluate, forward, rollout
from rltk.batch import Batch, collate
from rltk.config import load_config
from rltk.pipeline import run, run_warm_start
from rltk.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
VOWELS = ["rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["RLTK_NO_PROGRESS"] = "1"
    return env


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _adapter(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    files = list((run_dir / "checkpoints" / f"step-{step:06d}").rglob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def test_steps_log_metrics_and_checkpoint(tiny_model_dir: str, tmp_path: Path) -> None:
    cfg = load_config(RECIPE, [*tiny_overrides(tiny_model_dir, tmp_path), *VOWELS])
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.policy.lm.named_parameters() if v.requires_grad}
    trainer.train()
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/mean", "loss", "grad_norm", "time/step_s", "tokens/per_s", "mismatch/logp_abs_mean"):
        assert key in rows[-1], key
    assert rows[-1]["mismatch/logp_abs_mean"] < 1e-3  # old log-probs from the training path match sampling
    after = dict(trainer.policy.lm.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter moved"
    assert (tmp_path / "checkpoints" / "step-000002" / "manifest.json").is_file()
    assert (tmp_path / "config.yaml").is_file()


def test_held_out_eval_before_rl_every_n_steps_and_at_the_end(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path, steps=3), *VOWELS, "eval.every=2", "eval.n=12"]
    trainer = Trainer(load_config(RECIPE, overrides))
    trainer.train()
    evals = [r for r in _metrics(tmp_path) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    tasks = trainer.env.tasks("eval", 12, seed=0)  # the set `rltk eval --n 12` scores
    final = evaluate.model_result(
        trainer.policy.lm,
        trainer.tokenizer,
        trainer.env,
        trainer.rubric,
        tasks,
        trainer.cfg.eval.max_new_tokens,
        "x",
    )
    assert evals[-1]["eval/accuracy"] == final.accuracy
    assert evals[-1]["eval/mean_reward"] == final.mean_reward
    rows = [json.loads(line) for line in (tmp_path / "evals" / "step_000003.jsonl").read_text().splitlines()]
    assert [r["task"] for r in rows] == [t.id for t in tasks]
    assert sum(r["correct"] for r in rows) / len(rows) == final.accuracy
    assert all(isinstance(r["turns"][0], str) for r in rows)
    written = sorted(p.name for p in (tmp_path / "evals").iterdir())
    assert written == [f"step_00000{i}.jsonl" for i in (0, 2, 3)]
    trivial = max(r.accuracy for r in evaluate.baseline_results(trainer.env, trainer.rubric, tasks))
    assert all(r["eval/best_trivial_accuracy"] == trivial for r in evals)
    assert trivial >= 0.5  # policy_flagging's best constant answer: never 0 on a balanced-ish split


def _train_cmd(model_dir: str, run_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "rltk.train", RECIPE, *tiny_overrides(model_dir, run_dir, steps), *VOWELS]


def test_sigkill_after_step_3_then_resume_equals_uninterrupted(tiny_model_dir: str, tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(tiny_model_dir, full, 6), env=_env(), check=True, capture_output=True)

    sigkill_once_saved(_train_cmd(tiny_model_dir, killed, 6), _env(), killed, 3)
    assert not (killed / "checkpoints" / "step-000006" / "manifest.json").exists(), (
        "run ended before the kill"
    )

    subprocess.run(_train_cmd(tiny_model_dir, killed, 6), env=_env(), check=True, capture_output=True)
    a, b = _adapter(full, 6), _adapter(killed, 6)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_full, rows_killed = _metrics(full), _metrics(killed)
    assert [r["step"] for r in rows_killed] == [1, 2, 3, 4, 5, 6]  # lines after the restored step dropped
    assert [r["reward/mean"] for r in rows_full] == [r["reward/mean"] for r in rows_killed]


def test_warm_start_learns_oracle_format(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [
        *tiny_overrides(tiny_model_dir, tmp_path, steps=1),
        "warmstart.enabled=true",
        "warmstart.steps=6",
    ]
    overrides += ["warmstart.lr=3e-3", "warmstart.batch_size=4"]
    trainer = run(load_config(RECIPE, overrides))
    rows = _metrics(tmp_path)
    warm = [r for r in rows if "warmstart/loss" in r]
    assert warm and warm[-1]["step"] == 0
    assert (tmp_path / "checkpoints" / "step-000000" / "manifest.json").is_file()
    assert trainer.start_step == 0


def test_warm_start_linear_schedule_decays_to_zero(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path, steps=1), "warmstart.enabled=true"]
    overrides += ["warmstart.steps=4", "warmstart.lr=1e-3", "warmstart.schedule=linear"]
    from rltk.warmstart import warm_start

    metrics = warm_start(Trainer(load_config(RECIPE, overrides)))
    assert abs(metrics["warmstart/lr"] - 1e-3 / 4) < 1e-12  # the last step ran at lr * 1/4; the next is 0


def test_a_warm_start_longer_than_its_task_pool_repeats_it_in_epochs(
    tiny_model_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SFT-only run may ask for steps x batch_size tasks no generator can draw: it draws a pool of
    ``MAX_DEMO_TASKS`` and goes round it (4 steps of 3 over a pool of 5: tasks 0-2, 3 4 0, 1-3, 4 0 1)."""
    from rltk import warmstart

    monkeypatch.setattr(warmstart, "MAX_DEMO_TASKS", 5)
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path, steps=1), "warmstart.enabled=true"]
    trainer = Trainer(load_config(RECIPE, [*overrides, "warmstart.steps=4", "warmstart.batch_size=3"]))
    drawn, played = [], []
    tasks, group = trainer.env.tasks, warmstart.demonstration_group
    monkeypatch.setattr(
        trainer.env, "tasks", lambda split, n, seed=0: drawn.append(n) or tasks(split, n, seed)
    )
    monkeypatch.setattr(
        warmstart, "demonstration_group", lambda tok, env, t, p: played.append(t) or group(tok, env, t, p)
    )
    warmstart.warm_start(trainer)
    pool = tasks("train", 5, seed=trainer.cfg.run.seed + warmstart.WARMSTART_SEED_OFFSET)
    assert drawn == [5]
    assert [t.id for t in played] == [pool[i % 5].id for i in range(12)]


def _fixed_batch(trainer: Trainer) -> Batch:
    """One rollout batch of the trainer's env, sampled once (kept fixed while the policy moves)."""
    torch.manual_seed(0)
    tasks = trainer.tasks_for_step(0)
    groups = rollout.generate(
        trainer.policy.lm, trainer.tokenizer, trainer.env, tasks, group_size=2, max_new_tokens=4
    )
    return collate(groups, trainer.tokenizer.pad_token_id)


def test_kl_reference_is_the_warm_started_policy(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [
        *tiny_overrides(tiny_model_dir, tmp_path, steps=2),
        "warmstart.enabled=true",
        "warmstart.steps=3",
        "warmstart.lr=3e-3",
        "algorithm.beta=0.1",
        *VOWELS,
    ]
    trainer = Trainer(load_config(RECIPE, overrides))

    run_warm_start(trainer)
    assert trainer.policy.reference is not None
    warm = {k: v.clone() for k, v in trainer.policy.lm.named_parameters() if v.requires_grad}
    assert all(torch.equal(trainer.policy.reference[k], warm[k]) for k in warm)
    batch = _fixed_batch(trainer)
    ref_before = trainer.policy.reference_logprobs(batch)
    trainer.policy.reference = None  # without a snapshot the reference is the base (adapters disabled) ...
    base = trainer.policy.reference_logprobs(batch)
    trainer.policy.reference = {k: v.clone() for k, v in warm.items()}
    assert not torch.allclose(ref_before, base)  # ... which the warm start moved away from
    trainer.train()
    moved = dict(trainer.policy.lm.named_parameters())
    assert any(not torch.equal(warm[k], moved[k]) for k in warm), "RL did not move the policy"
    assert torch.equal(trainer.policy.reference_logprobs(batch), ref_before), (
        "the reference moved with the policy"
    )
    now = dict(trainer.policy.lm.named_parameters())
    assert all(torch.equal(moved[k], now[k]) for k in warm)  # the policy's weights were swapped back
    resumed = Trainer(load_config(RECIPE, overrides))
    assert resumed.start_step == 2 and resumed.policy.reference is not None
    assert all(torch.equal(resumed.policy.reference[k], warm[k]) for k in warm)


def test_full_finetune_kl_reference_is_the_initial_weights(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path, steps=1), "model.lora.enabled=false"]
    overrides.append("algorithm.beta=0.1")
    trainer = Trainer(load_config(RECIPE, [*overrides, *VOWELS]))
    batch = _fixed_batch(trainer)
    ref_before = trainer.policy.reference_logprobs(batch)
    trainer.train()
    assert _metrics(tmp_path)[-1]["loss/kl_mean"] >= 0.0
    assert torch.equal(trainer.policy.reference_logprobs(batch), ref_before)
    assert not torch.equal(forward.completion_logprobs(trainer.policy.lm, batch).detach(), ref_before)


def test_bf16_mixed_precision_runs_and_keeps_fp32_weights(tiny_model_dir: str, tmp_path: Path) -> None:
    from accelerate.state import AcceleratorState

    overrides = [*tiny_overrides(tiny_model_dir, tmp_path, steps=1), "model.mixed_precision=bf16", *VOWELS]
    cfg = load_config(RECIPE, overrides)
    AcceleratorState._reset_state()  # the process-wide accelerate state was built by earlier tests in fp32
    try:
        trainer = Trainer(cfg)
        trainer.train()
    finally:
        AcceleratorState._reset_state()
    row = _metrics(tmp_path)[-1]
    assert torch.isfinite(torch.tensor(row["loss"])) and row["grad_norm"] > 0
    assert 0 < row["mismatch/logp_abs_mean"] < 0.5  # bf16 rounding shows up, but small
    assert all(p.dtype == torch.float32 for p in trainer.policy.lm.parameters())


def test_maxrl_with_answer_balancing_runs_and_logs_answer_shares(tiny_model_dir: str, tmp_path: Path) -> None:
    params = "{miss_cost: 0, false_alarm_cost: 0}"
    accuracy_reward = f"rewards=[{{name: flag_decision, weight: 1.0, params: {params}}}]"
    overrides = [*tiny_overrides(tiny_model_dir, tmp_path, steps=1), accuracy_reward]
    overrides += ["algorithm.name=maxrl", "algorithm.balance_answers=true"]
    trainer = Trainer(load_config(RECIPE, overrides))
    assert trainer.algo.estimator == "maxrl" and trainer.algo.balance_answers
    trainer.train()
    row = _metrics(tmp_path)[-1]
    assert "advantage/balance_removed" in row and torch.isfinite(torch.tensor(row["loss"]))
    shares = {k: v for k, v in row.items() if k.startswith("answer_share/")}
    assert shares and abs(sum(shares.values()) - 1) < 1e-6, shares


@pytest.mark.parametrize(("setting", "expected"), [("0", 6), ("9", 9)])
def test_eval_token_budget_is_the_envs_unless_set(
    tiny_model_dir: str, tmp_path: Path, setting: str, expected: int
) -> None:
    cfg = load_config(RECIPE, [*tiny_overrides(tiny_model_dir, tmp_path), f"eval.max_new_tokens={setting}"])
    trainer = Trainer(cfg)
    assert trainer.env.max_new_tokens == 6 and trainer.eval_max_new_tokens == expected
