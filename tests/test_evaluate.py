"""Eval: greedy answers equal plain HF greedy generation; reports put trivial policies beside the model."""

from __future__ import annotations

import pytest
import torch

from rltk import evaluate, plugins
from rltk.chat import render_prompt
from rltk.env import run_policy
from rltk.reward import Rubric


def test_greedy_eval_answers_equal_plain_generate(tiny_model, tokenizer) -> None:
    env = plugins.get_env("policy_flagging")()
    tasks = env.tasks("eval", 5, seed=0)
    rubric = Rubric.from_config([], env)
    rollouts = evaluate.model_rollouts(
        tiny_model, tokenizer, env, rubric, tasks, max_new_tokens=6, batch_size=3
    )
    got = [r.turns[0] for r in rollouts]
    want = []
    for t in tasks:
        ids = torch.tensor([render_prompt(tokenizer, t.messages)])
        out = tiny_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        want.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert got == want


def test_report_table_has_baselines_and_per_rule_accuracy() -> None:
    env = plugins.get_env("policy_flagging")()
    rubric = Rubric.from_config([], env)
    tasks = env.tasks("eval", 48, seed=0)
    results = [evaluate.evaluate_policy(env, rubric, tasks, env.oracle, "oracle")]
    results += evaluate.baseline_results(env, rubric, tasks)
    assert results[0].accuracy == 1.0
    best_constant = evaluate.best_of(results, "constant")
    assert best_constant is not None and best_constant.accuracy == 0.5
    table = evaluate.format_table(results)
    assert "rule=R1" in table and "constant_clear" in table and "oracle" in table
    flag = next(r for r in results if r.name == "constant_flag")
    assert flag.by_tag["rule=R2"] == 1.0 and flag.by_tag["rule=None"] == 0.0


VARIANTS = [
    ("policy_flagging", {}),
    ("policy_flagging", {"difficulty": "combined"}),
    ("policy_flagging", {"checklist": True}),
    ("invoice_extraction", {"difficulty": "hard"}),
    ("sql_analytics", {"difficulty": "hard"}),
    ("sql_analytics", {"tool_calling": "native"}),
    ("support_refund", {"difficulty": "hard"}),
    ("support_refund", {"tool_calling": "native"}),
    ("doc_search_qa", {"difficulty": "hard"}),
    ("doc_search_qa", {"tool_calling": "native"}),
]


@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_every_oracle_turn_fits_the_envs_max_new_tokens(tokenizer, name: str, options: dict) -> None:
    """``Env.max_new_tokens`` is ``rltk eval``'s default: a smaller one would cut the oracle's own answers."""
    env = plugins.make_env(name, options)
    turns = [a for t in env.tasks("eval", 60) for a in run_policy(env, t, env.oracle).actions]
    longest = max(len(tokenizer(a, add_special_tokens=False).input_ids) for a in turns)
    assert longest <= env.max_new_tokens, (name, options, longest)
