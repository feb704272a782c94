"""Rollout: prefill-once sampling (with or without a prefix shared by all prompts) is token-identical to
``generate(num_return_sequences=G)``; EOS; limits."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from conftest import make_tiny_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from rltk.batch import Group, collate
from rltk.chat import observation_ids, render_prompt
from rltk.env import Env, Message, Task
from rltk.forward import completion_logprobs
from rltk.prefix import MIN_SHARED_PREFIX, shared_prefix_length
from rltk.rollout import generate

G = 4
MAX_NEW = 12
SEED = 1234


class WordsEnv(Env):
    """Single-turn toy env: the prompt asks to repeat some words; the verdict is the answer's length."""

    name = "words"
    description = "toy env for tests"

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        texts = ["one", "two words here please", "three " * 9]  # ragged prompts
        return [
            Task(
                id=f"words/{split}/{i}",
                split=split,
                messages=[{"role": "user", "content": texts[i % 3]}],
                reference={},
            )
            for i in range(n)
        ]

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        return {"correct": False, "chars": len(completion)}  # the engine requires a bool "correct"

    def oracle(self, messages: list[Message]) -> str:
        return messages[-1]["content"]


class TwoTurnEnv(WordsEnv):
    max_turns: ClassVar[int] = 2


POLICY = (
    "You review card transactions for a bank. Flag a transaction when the amount is over the customer's "
    "usual range, the merchant category is on the watch list, or the country differs from the card's home "
    "country. Answer with FLAG or PASS and one short reason."
)  # ~60 tokens: a system prompt shared by all tasks


class PolicyEnv(WordsEnv):
    """Every task: the same long system message, then a ragged user message (a long shared prefix)."""

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        return [
            Task(t.id, t.split, [{"role": "system", "content": POLICY}, *t.messages], t.reference)
            for t in super().tasks(split, n, seed)
        ]


class DistinctSystemEnv(WordsEnv):
    """Each task starts with its own system message: the prompts share only a few template tokens."""

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        return [
            Task(t.id, t.split, [{"role": "system", "content": f"{i} {POLICY}"}, *t.messages], t.reference)
            for i, t in enumerate(super().tasks(split, n, seed))
        ]


def eos_prone_model(tokenizer: PreTrainedTokenizerBase, lora: bool = False) -> nn.Module:
    """The tiny model with a bias on EOS, so most (not all) samples end with EOS within MAX_NEW tokens."""
    model = make_tiny_model(tokenizer)
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 8.5
    model.lm_head = head
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(2)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.05)
    return model


def reference_samples(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, tasks: list[Task], **sampling: Any
) -> tuple[list[list[int]], list[list[float]]]:
    """Plain ``generate(num_return_sequences=G)`` under SEED: ids and sample log-probs, cut after EOS."""
    prompts = [render_prompt(tokenizer, t.messages) for t in tasks]
    lp, pad, eos = max(map(len, prompts)), tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (lp - len(x)) + x for x in prompts])
    mask = torch.tensor([[0] * (lp - len(x)) + [1] * len(x) for x in prompts])
    torch.manual_seed(SEED)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        num_return_sequences=G,
        max_new_tokens=MAX_NEW,
        eos_token_id=[eos],
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_scores=True,
        **sampling,
    )
    new = out.sequences[:, lp:]  # [P*G, T]
    scores = torch.stack(out.scores, dim=1).log_softmax(-1)  # [P*G, T, V]
    logps = scores.gather(-1, new[..., None]).squeeze(-1)  # [P*G, T]
    rows, row_logps = [], []
    for row, logp in zip(new.tolist(), logps.tolist(), strict=True):
        end = row.index(eos) + 1 if eos in row else len(row)
        rows.append(row[:end])
        row_logps.append(logp[:end])
    return rows, row_logps


@pytest.mark.parametrize(
    ("top_p", "lora", "env", "shares_prefix"),
    [
        (1.0, False, WordsEnv(), True),  # the template's default system message (~25 tokens) is shared
        (0.9, False, WordsEnv(), True),
        (1.0, True, WordsEnv(), True),
        (1.0, False, PolicyEnv(), True),  # a ~60-token system message, ragged user messages
        (1.0, True, PolicyEnv(), True),
        (1.0, False, DistinctSystemEnv(), False),  # no prefix worth sharing: per-prompt prefill only
    ],
    ids=["plain", "top_p", "lora", "long_prefix", "long_prefix_lora", "no_shared_prefix"],
)
def test_prefill_once_matches_generate(
    tokenizer: PreTrainedTokenizerBase, top_p: float, lora: bool, env: WordsEnv, shares_prefix: bool
) -> None:
    model = eos_prone_model(tokenizer, lora=lora)
    tasks = env.tasks("train", 3)
    prompts = [render_prompt(tokenizer, t.messages) for t in tasks]
    lp = max(map(len, prompts))
    ids = torch.tensor([[0] * (lp - len(x)) + x for x in prompts])
    mask = torch.tensor([[0] * (lp - len(x)) + [1] * len(x) for x in prompts])
    prefix = shared_prefix_length(ids, mask)
    assert (prefix >= MIN_SHARED_PREFIX) == shares_prefix, prefix  # the case tests what it says
    if isinstance(env, PolicyEnv):
        assert prefix >= 60 and len({len(x) for x in prompts}) == 3, prefix
    sampling = {"temperature": 0.9, "top_k": 0, "top_p": top_p}
    ref, ref_logp = reference_samples(model, tokenizer, tasks, **sampling)
    model.train()
    state = torch.get_rng_state()
    groups = generate(
        model, tokenizer, env, tasks, group_size=G, max_new_tokens=MAX_NEW, seed=SEED, **sampling
    )
    assert model.training, "the model's mode must be restored"
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must be left alone"
    got = [r.token_ids.tolist() for gr in groups for r in gr.rollouts]
    assert got == ref
    assert len({tuple(r) for r in got}) > 1, "samples should differ"
    # the same distributions, not just the same draws (sampling is robust to small logit errors)
    logp = torch.tensor([x for gr in groups for r in gr.rollouts for x in r.sample_logp.tolist()])
    diff = (logp - torch.tensor([x for row in ref_logp for x in row])).abs().max().item()
    assert diff < 1e-5, diff
    print(f"{top_p=} {lora=} {prefix=}: tokens identical, max |sample_logp - generate's| = {diff:.2e}")
    for task, group in zip(tasks, groups, strict=True):
        assert group.task is task and group.prompt_ids.tolist() == render_prompt(tokenizer, task.messages)
        assert len(group.rollouts) == G
        for r in group.rollouts:
            assert r.turns == [tokenizer.decode(r.token_ids, skip_special_tokens=True)]
            assert r.outcome == {"correct": False, "chars": len(r.turns[0])}


def test_eos_handling(tokenizer: PreTrainedTokenizerBase) -> None:
    model = eos_prone_model(tokenizer)
    env = WordsEnv()
    groups = generate(
        model, tokenizer, env, env.tasks("eval", 3), group_size=G, max_new_tokens=MAX_NEW, seed=7
    )
    eos = tokenizer.eos_token_id
    rollouts = [r for gr in groups for r in gr.rollouts]
    ended = [r for r in rollouts if eos in r.token_ids.tolist()]
    assert ended and len(ended) < len(rollouts), "the test needs rollouts with and without EOS"
    for r in rollouts:
        ids = r.token_ids.tolist()
        assert len(ids) == len(r.loss_mask) == len(r.sample_logp) >= 1
        assert r.loss_mask.tolist() == [1] * len(ids)  # the EOS is a model action: trained on
        assert (r.sample_logp < 0).all() and r.sample_logp.isfinite().all()
        if eos in ids:
            assert ids.index(eos) == len(ids) - 1 and not r.truncated  # cut right after the first EOS
        else:
            assert len(ids) == MAX_NEW and r.truncated


@pytest.mark.parametrize("min_new", [0, 3])
def test_sample_logp_matches_training_forward(tokenizer: PreTrainedTokenizerBase, min_new: int) -> None:
    model = eos_prone_model(tokenizer)
    env = WordsEnv()
    groups = generate(
        model, tokenizer, env, env.tasks("train", 3), group_size=G, max_new_tokens=MAX_NEW,
        min_new_tokens=min_new, temperature=0.9, seed=3,
    )  # fmt: skip
    for gr in groups:
        assert all(len(r.token_ids) > min_new for r in gr.rollouts)
    batch = collate(groups, tokenizer.pad_token_id)
    with torch.no_grad():
        logp = completion_logprobs(model, batch, temperature=0.9, mode="off")  # [N, Lc]
    real = batch.completion_mask.bool()
    diff = (logp - batch.sample_logp)[real].abs()
    if min_new == 0:
        assert diff.max().item() < 1e-4, diff.max().item()
        print(f"max |sample_logp - forward logp| = {diff.max().item():.2e}")
    else:  # suppressing EOS renormalises the sampling distribution: sample_logp is the processed one
        assert diff.max().item() > 1e-3


def test_prompt_too_long(tokenizer: PreTrainedTokenizerBase, tiny_model: nn.Module) -> None:
    env = WordsEnv()
    task = env.tasks("test", 3)[2]
    n = len(render_prompt(tokenizer, task.messages))
    with pytest.raises(ValueError, match="max_prompt_tokens") as exc:
        generate(tiny_model, tokenizer, env, [task], group_size=2, max_new_tokens=4, max_prompt_tokens=n - 1)
    msg = str(exc.value)
    assert task.id in msg and f"{n} tokens" in msg and f"limit of {n - 1}" in msg and "Shorten" in msg
    with pytest.raises(ValueError, match=r"context 2048 - max_new_tokens 2040") as exc:
        generate(tiny_model, tokenizer, env, [task], group_size=2, max_new_tokens=2040)
    assert "limit of 8" in str(exc.value) and "lower rollout.max_new_tokens" in str(exc.value)


def test_arguments_and_multi_turn(tokenizer: PreTrainedTokenizerBase, tiny_model: nn.Module) -> None:
    env = WordsEnv()
    tasks = env.tasks("train", 1)
    groups = generate(tiny_model, tokenizer, TwoTurnEnv(), tasks, group_size=2, max_new_tokens=4)
    assert all(1 <= len(r.turns) <= 2 for r in groups[0].rollouts)  # multi-turn: tests/test_multiturn.py
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate(tiny_model, tokenizer, env, tasks, group_size=2, max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="max_turns"):
        generate(tiny_model, tokenizer, env, tasks, group_size=2, max_new_tokens=4, max_turns=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(tiny_model, tokenizer, env, tasks, group_size=2, max_new_tokens=4, temperature=-1.0)
    greedy = generate(tiny_model, tokenizer, env, tasks, group_size=2, max_new_tokens=4, temperature=0.0)
    assert torch.equal(greedy[0].rollouts[0].token_ids, greedy[0].rollouts[1].token_ids)
    assert generate(tiny_model, tokenizer, env, [], group_size=2, max_new_tokens=4) == []


def test_observation_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "CALL lookup"}]
    obs = observation_ids(tokenizer, history, "result: 42")
    full = render_prompt(tokenizer, [*history, {"role": "user", "content": "result: 42"}])
    assert full[-len(obs) :] == obs
    assert tokenizer.decode(obs) == "<|im_start|>user\nresult: 42<|im_end|>\n<|im_start|>assistant\n"


def test_groups_collate(tokenizer: PreTrainedTokenizerBase, tiny_model: nn.Module) -> None:
    env = WordsEnv()
    groups: list[Group] = generate(
        tiny_model, tokenizer, env, env.tasks("train", 2), group_size=2, max_new_tokens=3
    )
    batch = collate(groups, tokenizer.pad_token_id)
    assert batch.completion_ids.shape == (4, 3) and batch.prompt_ids.shape[0] == 2
