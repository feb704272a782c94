"""Multi-turn rollouts: env tokens masked, ids as generated, the update's log-probs equal the sampler's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from plugins_for_tests import CounterToolEnv

from rltk import forward
from rltk.batch import collate
from rltk.chat import render_prompt, turn_close_ids
from rltk.config import load_config
from rltk.env import run_policy
from rltk.rollout import generate
from rltk.sampler import eos_token_ids
from rltk.tools import FinalAnswer, Malformed, ToolCall, ToolEpisode, parse_action
from rltk.trainer import Trainer

RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml")


def _play(model, tokenizer, n_tasks: int = 3, g: int = 2, **kwargs):
    env = CounterToolEnv()
    tasks = env.tasks("train", n_tasks)
    args = {"group_size": g, "max_new_tokens": 6, "temperature": 0.7, "seed": 3, **kwargs}
    return env, generate(model, tokenizer, env, tasks, **args)


def test_oracle_solves_every_task_in_three_turns() -> None:
    env = CounterToolEnv()
    for task in env.tasks("eval", 10):
        episode = run_policy(env, task, env.oracle)
        assert episode.outcome["correct"] and episode.outcome["answered"]
        assert len(episode.actions) == len(task.messages[1]["content"].split(" and ")) + 1


def test_ragged_three_turn_batch_is_on_policy(tiny_model, tokenizer) -> None:
    """The update's forward on the assembled ids reproduces the sampler's log-probs (ratio 1 within 1e-5)."""
    torch.manual_seed(0)
    _, groups = _play(tiny_model, tokenizer, n_tasks=3, g=3)
    rollouts = [r for g in groups for r in g.rollouts]
    assert {len(r.turns) for r in rollouts} == {3}  # a random model never answers: 3 turns each
    assert all(r.stop_reason == "max_turns" and r.truncated for r in rollouts)
    lengths = {len(r.token_ids) for r in rollouts}
    assert len(lengths) > 1, "the batch should be ragged"
    assert any(0 < int(r.loss_mask.sum()) < 3 * 6 for r in rollouts)  # some turns ended at the stop string
    batch = collate(groups, tokenizer.pad_token_id)
    mask = batch.loss_mask.bool()
    assert (batch.sample_logp[~mask] == 0).all()
    for mode in ("off", "kv", "packed"):
        with torch.no_grad():
            logp = forward.completion_logprobs(tiny_model, batch, temperature=0.7, mode=mode)  # [P*G, Lc]
        gap = (logp - batch.sample_logp)[mask].abs().max().item()
        assert gap < 1e-5, (mode, gap)


def test_env_tokens_are_the_template_and_masked(tiny_model, tokenizer) -> None:
    _, groups = _play(tiny_model, tokenizer)
    eos = set(eos_token_ids(tiny_model, tokenizer))
    close = turn_close_ids(tokenizer, sorted(eos))
    assert tokenizer.decode(close) == "<|im_end|>\n"
    for group in groups:
        for r in group.rollouts:
            ids, mask = r.token_ids.tolist(), r.loss_mask.tolist()
            # split into alternating model / env segments
            segments, start = [], 0
            for i in range(1, len(ids) + 1):
                if i == len(ids) or mask[i] != mask[start]:
                    segments.append((mask[start], ids[start:i]))
                    start = i
            model_segments = [s for m, s in segments if m == 1]
            env_segments = [s for m, s in segments if m == 0]
            assert len(model_segments) == 3 and len(env_segments) == 2
            for k, (turn_ids, env_ids) in enumerate(zip(model_segments, env_segments, strict=False)):
                # the env closes the turn only where the model did not, then renders the observation
                expected_close = close[1:] if turn_ids[-1] in eos else close
                assert env_ids[: len(expected_close)] == expected_close
                text = tokenizer.decode(env_ids)
                assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n<error>" in text, text
                assert r.turns[k] in tokenizer.decode(turn_ids, skip_special_tokens=True)
            # the prompt plus the env's tokens re-render as the chat template of the whole conversation
            history = list(group.task.messages)
            for k, turn in enumerate(r.turns):
                history.append({"role": "assistant", "content": turn})
                if k < 2:
                    history.append({"role": "user", "content": _observation(env_segments[k], tokenizer)})
            rendered = tokenizer.decode(render_prompt(tokenizer, history, add_generation_prompt=False))
            assert rendered.startswith(tokenizer.decode(group.prompt_ids.tolist()))


def _observation(env_ids: list[int], tokenizer) -> str:
    text = tokenizer.decode(env_ids)
    return text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def test_stop_string_cuts_the_turn_but_keeps_the_token(tiny_model, tokenizer) -> None:
    _, groups = _play(tiny_model, tokenizer)
    for r in (r for g in groups for r in g.rollouts):
        for turn in r.turns:
            assert "a" not in turn[:-1]  # the env saw the turn up to its first stop string only
    # the ids were not re-tokenized: somewhere a kept token carries text past the stop string
    tails = []
    for r in (r for g in groups for r in g.rollouts):
        ids, mask = r.token_ids.tolist(), r.loss_mask.tolist()
        for i, m in enumerate(mask):
            if m and (i + 1 == len(mask) or not mask[i + 1]):
                piece = tokenizer.decode([ids[i]])
                tails.append("a" in piece and not piece.endswith("a"))
    assert any(tails)


def test_limits_end_rollouts_cleanly(tiny_model, tokenizer) -> None:
    _, groups = _play(tiny_model, tokenizer, max_turns=2)
    assert all(len(r.turns) == 2 and r.stop_reason == "max_turns" for g in groups for r in g.rollouts)
    _, groups = _play(tiny_model, tokenizer, max_rollout_tokens=12)
    rollouts = [r for g in groups for r in g.rollouts]
    assert all(len(r.token_ids) <= 12 and r.truncated for r in rollouts)
    assert any(r.stop_reason == "max_tokens" for r in rollouts)
    assert all(r.outcome == {"correct": False, "answered": False} for r in rollouts)


def test_episode_state_is_per_rollout_and_tool_errors_are_observations() -> None:
    env = CounterToolEnv()
    task = env.tasks("eval", 1)[0]
    a, b = env.episode(task), env.episode(task)
    assert a.step("<tool>add: 5</tool>").observation == "<result>5</result>"
    assert b.step("<tool>add: 1</tool>").observation == "<result>1</result>"  # b has its own counter
    assert a.step("<tool>add: five</tool>").observation.startswith("<error>add failed:")
    assert a.step("<tool>rm: x</tool>").observation == "<error>unknown tool 'rm'; tools: add</error>"
    step = a.step("<answer>5</answer>")
    assert step.done and a.outcome["answered"] and a.outcome["counter"] == 5
    assert a.outcome["correct"] == (task.reference["total"] == 5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<tool>add: 3</tool>", ToolCall("add", "3")),
        ("thinking... <tool> add :  3 </tool>", ToolCall("add", "3")),
        ("<tool>add</tool>", ToolCall("add", "")),
        ("<answer>7</answer>", FinalAnswer("7")),
        ("", Malformed),
        ("7", Malformed),
        ("<answer>7", Malformed),  # unclosed: the turn hit its token limit
        ("<answer>7</answer> or <answer>8</answer>", Malformed),  # a hedge
        ("<tool>add: 1</tool><answer>1</answer>", Malformed),
        ("<tool>: 1</tool>", Malformed),
    ],
)
def test_parse_action(text: str, expected) -> None:
    parsed = parse_action(text, {"add": None})
    if expected is Malformed:
        assert isinstance(parsed, Malformed) and parsed.error
    else:
        assert parsed == expected


def test_long_tool_results_are_cut() -> None:
    env = CounterToolEnv()
    episode = ToolEpisode(env.tasks("eval", 1)[0], {"dump": lambda _: "x" * 50}, dict, max_result_chars=10)
    assert (
        episode.step("<tool>dump</tool>").observation
        == "<result>xxxxxxxxxx... [cut at 10 characters]</result>"
    )


def test_trainer_runs_a_multi_turn_env(tiny_model_dir: str, tmp_path: Path) -> None:
    overrides = [
        *tiny_overrides(tiny_model_dir, tmp_path),
        "env.name=plugins_for_tests:CounterToolEnv",
        "env.options={}",
        "rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]",  # varies on a random model
        "rollout.max_new_tokens=6",
    ]
    trainer = Trainer(load_config(RECIPE, overrides))
    before = {k: v.clone() for k, v in trainer.policy.lm.named_parameters() if v.requires_grad}
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["rollout/turns_mean"] == 3 and rows[-1]["rollout/stopped_max_turns"] == 1.0
    assert rows[-1]["mismatch/logp_abs_mean"] < 1e-4  # env tokens masked, model tokens on-policy
    after = dict(trainer.policy.lm.named_parameters())
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter moved"


def test_eval_plays_whole_episodes(tiny_model, tokenizer) -> None:
    from rltk.evaluate import model_result
    from rltk.reward import Rubric

    env = CounterToolEnv()
    tasks = env.tasks("eval", 4)
    result = model_result(tiny_model, tokenizer, env, Rubric.from_config([], env), tasks, 6, "tiny", 3)
    assert result.n == 4 and result.accuracy == 0.0  # a random model never answers the total


def test_warm_start_demonstrates_the_whole_oracle_episode(tokenizer) -> None:
    from rltk.warmstart import demonstration_group

    env = CounterToolEnv()
    task = env.tasks("train", 2)[1]  # two numbers: add, add, answer
    group = demonstration_group(tokenizer, env, task)
    rollout = group.rollouts[0]
    assert len(rollout.turns) == 3 and rollout.turns[-1].startswith("<answer>")
    # prompt + demonstration is the chat template of the oracle's whole conversation, token for token
    episode_messages = list(task.messages)
    for k, turn in enumerate(rollout.turns):
        episode_messages.append({"role": "assistant", "content": turn})
        if k < 2:
            episode_messages.append(
                {"role": "user", "content": f"<result>{_running_total(task, k)}</result>"}
            )
    full = render_prompt(tokenizer, episode_messages, add_generation_prompt=False)
    seq = group.prompt_ids.tolist() + rollout.token_ids.tolist()
    assert full[: len(seq)] == seq and tokenizer.decode(full[len(seq) :]) == "\n"
    # only the assistant turns are trained on: three segments, each ending with the end-of-turn token
    mask = rollout.loss_mask.tolist()
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert len(ends) == 3 and all(rollout.token_ids[i] == tokenizer.eos_token_id for i in ends)


def _running_total(task, k: int) -> int:
    numbers = [int(x) for x in task.messages[1]["content"].split("Add ")[1].split(" with")[0].split(" and ")]
    return sum(numbers[: k + 1])
