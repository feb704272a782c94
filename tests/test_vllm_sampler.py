"""VLLMSampler: vLLM in its own venv and process samples what HFSampler samples, with the trainer's log-probs.

The tests that start vLLM are skipped where ``.venv-vllm`` is missing (``bash scripts/setup_vllm.sh``
creates it); the merging of LoRA weights and the error for a missing venv are tested everywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import conftest
import pytest
import torch
from plugins_for_tests import CounterToolEnv
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from rltk.batch import Group, Rollout, collate
from rltk.chat import render_prompt
from rltk.config import load_config
from rltk.env import Task
from rltk.forward import completion_logprobs
from rltk.merge import merged_state_dict
from rltk.models import add_lora
from rltk.rollout import generate
from rltk.sampler import HFSampler, SamplingParams, TurnSample, stop_string_end
from rltk.trainer import Trainer
from rltk.vllm_sampler import DEFAULT_PYTHON, PYTHON_ENV, VLLMSampler

VLLM_PYTHON = os.environ.get(PYTHON_ENV) or str(DEFAULT_PYTHON)
RECIPE = str(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml")
needs_vllm = pytest.mark.skipif(
    not os.path.isfile(VLLM_PYTHON),
    reason=f"no vLLM venv at {VLLM_PYTHON}: create it with `bash scripts/setup_vllm.sh`",
)

SYSTEM = "You are a helpful assistant. Answer in one short sentence."
TEXTS = [
    "Hi",
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "Name three colours.",
    "Translate 'good morning' into French, please.",
    "Why is the sky blue? Explain it to a child who is five years old.",
    "List the days of the week.",
    "ok",
    "Summarise: the quick brown fox jumps over the lazy dog, again and again, all day long.",
    "Count from one to ten.",
]
LOGP_TOL = 1e-4  # mean |vLLM sample_logp - forward logp| (fp32 on both sides)
TIE_GAP = 1e-4  # greedy may diverge only where the top-2 logits are closer than this


def make_tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """conftest's tiny Llama with head size 32, not 16 (vLLM's CPU attention supports head sizes 32, 64, 80,
    ...), and initializer_range 0.3, not 0.02 (at 0.02 greedy decoding repeats the first token forever, which
    would make the parity tests trivial)."""
    return conftest.make_tiny_model(tokenizer, seed, heads=2, kv_heads=1, init_range=0.3)


def _prompts(tokenizer: PreTrainedTokenizerBase, n: int = len(TEXTS)) -> list[torch.Tensor]:
    msgs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}] for t in TEXTS[:n]]
    return [torch.tensor(render_prompt(tokenizer, m), dtype=torch.long) for m in msgs]


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    return make_tiny_model(tokenizer)


@pytest.fixture(scope="module")
def sampler(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> Iterator[VLLMSampler]:
    with VLLMSampler(model, tokenizer, python=VLLM_PYTHON, threads=2) as s:
        yield s


def _groups(prompts: list[torch.Tensor], samples: list[TurnSample], g: int) -> list[Group]:
    groups = []
    for i, prompt in enumerate(prompts):
        task = Task(f"t/{i}", "test", [], {})
        rollouts = [
            Rollout(task, [""], s.token_ids, torch.ones_like(s.token_ids), s.sample_logp)
            for s in samples[i * g : (i + 1) * g]
        ]
        groups.append(Group(task, prompt, rollouts))
    return groups


def _logp_gap(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[torch.Tensor],
    samples: list[TurnSample],
) -> tuple[float, float]:
    """Mean and max |sample_logp - completion_logprobs(model, T=0.7)| over the sampled tokens."""
    g = len(samples) // len(prompts)
    batch = collate(_groups(prompts, samples, g), tokenizer.pad_token_id)
    with torch.no_grad():
        logp = completion_logprobs(model, batch, temperature=0.7)  # [P*G, Lc]
    gap = (logp - batch.sample_logp)[batch.loss_mask.bool()].abs()
    return gap.mean().item(), gap.max().item()


def _top2_gap(model: nn.Module, prompt: torch.Tensor, prefix: list[int]) -> float:
    ids = torch.cat([prompt, torch.tensor(prefix, dtype=torch.long)])[None]
    with torch.no_grad():
        top = model(input_ids=ids).logits[0, -1].float().topk(2).values
    return (top[0] - top[1]).item()


def _assert_greedy_parity(
    model: nn.Module, prompts: list[torch.Tensor], hf: list[TurnSample], vl: list[TurnSample]
) -> int:
    """Token-identical greedy outputs, or a divergence at a near-tie; returns the number of divergences."""
    diverged = 0
    for prompt, a, b in zip(prompts, hf, vl, strict=True):
        x, y = a.token_ids.tolist(), b.token_ids.tolist()
        if x == y:
            assert a.finished == b.finished
            assert torch.allclose(a.sample_logp, b.sample_logp, atol=LOGP_TOL, rtol=0)
            continue
        t = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
        gap = _top2_gap(model, prompt, x[:t])
        assert gap < TIE_GAP, f"greedy diverged at token {t} where the top-2 logit gap is {gap:.2e}"
        diverged += 1
    return diverged


# -- no vLLM needed ---------------------------------------------------------------------------------------


def test_missing_venv_names_the_setup_script(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(FileNotFoundError, match=r"bash scripts/setup_vllm\.sh"):
        VLLMSampler(make_tiny_model(tokenizer), tokenizer, python="/nonexistent/bin/python")


def test_merged_state_dict_is_peft_merge_without_touching_the_model(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    plain = make_tiny_model(tokenizer)
    names = set(plain.state_dict())
    lora = add_lora(
        copy.deepcopy(plain), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    merged = merged_state_dict(lora)
    assert all(torch.equal(v, before[k]) for k, v in lora.state_dict().items()), "the model must not change"
    reference = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert set(merged) == set(reference) == names
    assert "lm_head.weight" in merged
    for k, v in merged.items():
        assert torch.allclose(v, reference[k], atol=1e-6, rtol=0), k
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], plain.model.layers[0].self_attn.q_proj.weight
    )
    assert merged["lm_head.weight"].data_ptr() != merged["model.embed_tokens.weight"].data_ptr()
    with lora.disable_adapter():  # adapters off: the base weights
        base = merged_state_dict(lora)
    assert all(torch.equal(base[k], v) for k, v in plain.state_dict().items())
    assert merged_state_dict(lora, torch.bfloat16)["model.norm.weight"].dtype == torch.bfloat16


# -- vLLM ------------------------------------------------------------------------------------------------


@needs_vllm
def test_greedy_matches_hf(
    sampler: VLLMSampler, model: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompts = _prompts(tokenizer)
    params = SamplingParams(max_new_tokens=16, temperature=0)
    hf = HFSampler(model, tokenizer)
    assert sampler.limits == hf.limits
    diverged = _assert_greedy_parity(
        model, prompts, hf.sample(prompts, 1, params), sampler.sample(prompts, 1, params)
    )
    print(f"greedy: {len(prompts) - diverged}/{len(prompts)} prompts token-identical")


@needs_vllm
def test_sample_logp_matches_training_forward(
    sampler: VLLMSampler, model: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompts = _prompts(tokenizer, 5)
    torch.manual_seed(0)
    samples = sampler.sample(prompts, 3, SamplingParams(max_new_tokens=12, temperature=0.7))
    assert len(samples) == 15 and all(len(s.token_ids) == len(s.sample_logp) == 12 for s in samples)
    assert len({tuple(s.token_ids.tolist()) for s in samples}) == 15, "samples should differ"
    mean, worst = _logp_gap(model, tokenizer, prompts, samples)
    print(f"T=0.7: mean |vLLM sample_logp - forward| = {mean:.2e}, max {worst:.2e}")
    assert mean < LOGP_TOL, (mean, worst)


def _sgd(model: nn.Module, ids: torch.Tensor, steps: int, lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@needs_vllm
def test_push_weights_full_and_lora(
    sampler: VLLMSampler, model: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompts = _prompts(tokenizer, 4)
    params = SamplingParams(max_new_tokens=10, temperature=0.7)
    target = torch.tensor([tokenizer.encode(" ".join(TEXTS))[:48]])
    torch.manual_seed(1)
    old = sampler.sample(prompts, 2, params)
    try:
        # 1. every weight changes, the tied embeddings / output layer included
        tuned = copy.deepcopy(model)
        _sgd(tuned, target, steps=2, lr=0.3)
        stale, _ = _logp_gap(tuned, tokenizer, prompts, old)
        sampler.push_weights(tuned)
        print(f"push (full): {sampler.last_push}")
        torch.manual_seed(1)
        mean, worst = _logp_gap(tuned, tokenizer, prompts, sampler.sample(prompts, 2, params))
        print(f"full update: stale gap {stale:.2e}; after push mean {mean:.2e}, max {worst:.2e}")
        assert stale > 100 * LOGP_TOL, "the update should move the log-probs"
        assert mean < LOGP_TOL, (mean, worst)
        # 2. LoRA on top of it: the engine gets base + delta, the training module stays unmerged
        lora = add_lora(
            tuned,
            r=4,
            alpha=8,
            dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        )
        _sgd(lora, target, steps=2, lr=0.3)
        torch.manual_seed(1)
        before = sampler.sample(prompts, 2, params)
        stale, _ = _logp_gap(lora, tokenizer, prompts, before)
        sampler.push_weights(lora)
        print(f"push (LoRA): {sampler.last_push}")
        assert any("lora_A" in n for n, _ in lora.named_parameters()), "the adapter must stay unmerged"
        torch.manual_seed(1)
        mean, worst = _logp_gap(lora, tokenizer, prompts, sampler.sample(prompts, 2, params))
        print(f"LoRA update: stale gap {stale:.2e}; after push mean {mean:.2e}, max {worst:.2e}")
        assert stale > 100 * LOGP_TOL, "the LoRA update should move the log-probs"
        assert mean < LOGP_TOL, (mean, worst)
    finally:
        sampler.push_weights(model)  # the other tests use the original weights
    torch.manual_seed(1)
    again = sampler.sample(prompts, 2, params)
    assert [s.token_ids.tolist() for s in again] == [s.token_ids.tolist() for s in old]


@needs_vllm
def test_stop_strings_and_eos_cut_like_hf(
    sampler: VLLMSampler, model: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompts = _prompts(tokenizer, 6)
    hf = HFSampler(model, tokenizer)
    free = sampler.sample(prompts, 1, SamplingParams(max_new_tokens=12, temperature=0))
    # a stop string that ends inside a token of the first greedy continuation: the token is kept whole
    row = free[0].token_ids.tolist()
    stop = ""
    for k in range(4, len(row)):
        prev, full = (tokenizer.decode(row[:j], skip_special_tokens=True) for j in (k - 1, k))
        if full.startswith(prev) and len(full) - len(prev) >= 2 and len(prev) >= 2:
            stop = full[len(prev) - 2 : len(prev) + 1]
            if stop.strip() and stop not in prev:
                break
            stop = ""
    assert stop, f"no token of {row} suits a stop string"
    # EOS: pretend a token of the greedy output ends turns (the model's own EOS never comes up in 12 tokens)
    eos = next(t for k, t in enumerate(row) if k >= 4 and t not in row[:k])
    original = (sampler.limits, hf.limits)
    sampler.limits = dataclasses.replace(sampler.limits, eos_ids=(*sampler.limits.eos_ids, eos))
    hf.limits = dataclasses.replace(hf.limits, eos_ids=sampler.limits.eos_ids)
    try:
        for params in (
            SamplingParams(max_new_tokens=12, temperature=0, stop_strings=(stop, "</tool>")),
            SamplingParams(max_new_tokens=12, temperature=0),
            SamplingParams(max_new_tokens=12, min_new_tokens=8, temperature=0, stop_strings=(stop,)),
        ):
            a, b = hf.sample(prompts, 1, params), sampler.sample(prompts, 1, params)
            assert _assert_greedy_parity(model, prompts, a, b) == 0
            assert any(s.finished for s in b) and any(len(s.token_ids) < 12 for s in b), params
        # sampled: many "EOS" ids, min_new_tokens, a stop string; every cut follows HFSampler's rule
        many = tuple(range(0, len(tokenizer), 23))
        sampler.limits = dataclasses.replace(original[0], eos_ids=many)
        torch.manual_seed(5)
        params = SamplingParams(max_new_tokens=12, min_new_tokens=2, temperature=1.0, stop_strings=("q",))
        samples = sampler.sample(prompts, 8, params)
    finally:
        sampler.limits, hf.limits = original
    kinds = set()
    for s in samples:
        ids = s.token_ids.tolist()
        first_eos = next((k + 1 for k, t in enumerate(ids) if t in many), None)
        assert first_eos in (None, len(ids)), "cut right after the first EOS, which is kept"
        assert first_eos is None or first_eos > 2, "no EOS before min_new_tokens"
        stop_end = stop_string_end(ids, tokenizer, ("q",))
        assert stop_end in (None, len(ids)), "cut right after the token that completes the stop string"
        assert s.finished == (first_eos is not None or stop_end is not None)
        assert s.finished or len(ids) == 12
        kinds.add("eos" if first_eos else "stop" if stop_end else "length")
    print(f"greedy stop string {stop!r}, stand-in EOS {eos}; sampled cuts: {sorted(kinds)}")
    assert kinds == {"eos", "stop", "length"}, kinds


@needs_vllm
def test_same_seed_same_samples(sampler: VLLMSampler, tokenizer: PreTrainedTokenizerBase) -> None:
    prompts = _prompts(tokenizer, 4)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50)

    def draw(seed: int) -> list[tuple[list[int], list[float]]]:
        torch.manual_seed(seed)
        return [(s.token_ids.tolist(), s.sample_logp.tolist()) for s in sampler.sample(prompts, 3, params)]

    first = draw(11)
    assert draw(11) == first
    assert draw(12) != first
    assert all(lp <= 0 for _, logp in first for lp in logp)


@needs_vllm
def test_multi_turn_rollouts_through_generate_are_on_policy(
    sampler: VLLMSampler, model: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    """rollout.generate with a VLLMSampler: ragged 3-turn tool episodes, turns cut at stop strings, env tokens
    masked; the trainer's forward on the assembled ids reproduces the sampler's log-probs."""
    env = CounterToolEnv()

    def play() -> list[Group]:
        return generate(
            sampler,
            tokenizer,
            env,
            env.tasks("train", 3),
            group_size=2,
            max_new_tokens=6,
            temperature=0.7,
            seed=3,
        )

    groups = play()
    rollouts = [r for g in groups for r in g.rollouts]
    assert len({len(r.token_ids) for r in rollouts}) > 1, "the batch should be ragged"
    assert any(0 < int(r.loss_mask.sum()) < 3 * 6 for r in rollouts)  # some turns ended at the stop string
    batch = collate(groups, tokenizer.pad_token_id)
    mask = batch.loss_mask.bool()
    with torch.no_grad():
        logp = completion_logprobs(model, batch, temperature=0.7)
    gap = (logp - batch.sample_logp)[mask].abs()
    print(
        f"multi-turn: mean |vLLM sample_logp - forward| = {gap.mean().item():.2e}, max {gap.max().item():.2e}"
    )
    assert gap.mean().item() < LOGP_TOL
    again = play()
    assert [r.token_ids.tolist() for g in again for r in g.rollouts] == [
        r.token_ids.tolist() for r in rollouts
    ]


@pytest.fixture(scope="module")
def vllm_model_dir(tokenizer: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The vLLM-compatible tiny model and the tokenizer saved as a local HF directory (``model.name``)."""
    path = tmp_path_factory.mktemp("tiny-vllm")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _vllm_run(model_dir: str, run_dir: Path, *extra: str) -> list[dict]:
    """``run.steps`` RL steps with ``rollout.backend=vllm`` at T = 0.7; the logged rows."""
    overrides = [
        *conftest.tiny_overrides(model_dir, run_dir, steps=4),
        "rollout.backend=vllm",
        f"rollout.vllm_python={VLLM_PYTHON}",
        "rollout.temperature=0.7",
        "optim.lr=1e-2",  # large enough that every push changes what the engine samples
        "rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]",
        *extra,
    ]
    trainer = Trainer(load_config(RECIPE, overrides))
    before = {k: v.clone() for k, v in trainer.policy.lm.named_parameters() if v.requires_grad}
    trainer.train()
    moved = dict(trainer.policy.lm.named_parameters())
    assert any(not torch.equal(before[k], moved[k]) for k in before), "the policy did not move"
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@needs_vllm
def test_a_quickstart_run_on_vllm_stays_on_policy_every_step(vllm_model_dir: str, tmp_path: Path) -> None:
    """Four steps, weights pushed after each: the update's log-probs equal the sampler's within 1e-4."""
    rows = _vllm_run(vllm_model_dir, tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["mismatch/logp_abs_mean"] <= 1e-4 for r in rows), [r["mismatch/logp_abs_mean"] for r in rows]


@needs_vllm
def test_multi_turn_episodes_on_vllm_stay_on_policy_across_pushes(
    vllm_model_dir: str, tmp_path: Path
) -> None:
    """Three-turn tool episodes, later turns sampled from the histories the engine cached in the same step,
    weights pushed after each step: on-policy every step."""
    rows = _vllm_run(
        vllm_model_dir,
        tmp_path,
        "env.name=plugins_for_tests:CounterToolEnv",
        "env.options={}",
        "rollout.max_new_tokens=6",
    )
    assert all(r["rollout/turns_mean"] > 1 for r in rows)
    assert all(r["mismatch/logp_abs_mean"] <= 1e-4 for r in rows), [r["mismatch/logp_abs_mean"] for r in rows]


@needs_vllm
def test_the_kv_cache_takes_fractions_of_a_gib_and_ignores_the_cpu_variable(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kv_cache_gib=0.25`` reaches vLLM as ``kv_cache_memory_bytes``; an inherited VLLM_CPU_KVCACHE_SPACE
    (whole GiB, which vLLM would let override it) does not reach the worker."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    with VLLMSampler(make_tiny_model(tokenizer), tokenizer, python=VLLM_PYTHON, kv_cache_gib=0.25) as s:
        assert s.engine_info["kv_cache_memory_bytes"] == 2**28
        assert len(s.sample([torch.arange(100, 140)], 2, SamplingParams(max_new_tokens=3))) == 2


@needs_vllm
def test_seeded_sampling_of_more_prompt_tokens_than_one_engine_step_takes(sampler: VLLMSampler) -> None:
    """24 prompts of 1000 tokens in one call: with chunked prefill (vLLM's default) some prompt is prefilled
    over two engine steps and vLLM fails rewinding its seeded CPU generator ("CPU Generator does not use
    offset"), as a 5-turn support_refund step of 8x8 episodes did."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 2000, (1000,), generator=gen) for _ in range(24)]
    torch.manual_seed(0)
    out = sampler.sample(prompts, 1, SamplingParams(max_new_tokens=4, temperature=1.0))
    torch.manual_seed(0)
    again = sampler.sample(prompts, 1, SamplingParams(max_new_tokens=4, temperature=1.0))
    assert len(out) == 24 and all(1 <= len(s.token_ids) <= 4 for s in out)
    assert [s.token_ids.tolist() for s in out] == [s.token_ids.tolist() for s in again]


@needs_vllm
def test_a_prefix_cached_before_a_push_is_not_reused(
    sampler: VLLMSampler, model: nn.Module, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The same 300-token prompt before and after a push: its KV blocks, cached under the old weights, must
    not be served after it (without the cache reset the log-probs differ by over 1 nat)."""
    prompt = [torch.randint(100, 2000, (300,), generator=torch.Generator().manual_seed(0))]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    tuned = copy.deepcopy(model)
    sampler.sample(prompt, 1, params)  # caches the prompt's blocks
    with torch.no_grad():
        for p in tuned.parameters():
            p.mul_(1.05)
    sampler.push_weights(tuned)
    try:
        after = sampler.sample(prompt, 1, params)[0]
        expected = HFSampler(tuned, tokenizer).sample(prompt, 1, params)[0]
        assert after.token_ids.tolist() == expected.token_ids.tolist()
        assert (after.sample_logp - expected.sample_logp).abs().max().item() < 1e-4
    finally:
        sampler.push_weights(model)  # the module's sampler serves the other tests


@needs_vllm
def test_two_ranks_each_sample_with_their_own_engine(vllm_model_dir: str, tmp_path: Path) -> None:
    """``accelerate launch`` on two gloo ranks, each with its own vLLM worker (the one-engine-per-rank form):
    both ranks end on the same weights and every step stays on-policy."""
    overrides = [
        *conftest.tiny_overrides(vllm_model_dir, tmp_path, steps=2),
        "rollout.backend=vllm",
        f"rollout.vllm_python={VLLM_PYTHON}",
        "rollout.vllm_kv_cache_gib=1",
        "rollout.temperature=0.7",
        "rewards=[{name: 'plugins_for_tests:vowel_share', weight: 1.0}]",
    ]
    tests = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=tests, RLTK_NO_PROGRESS="1", CUDA_VISIBLE_DEVICES="")
    cmd = conftest.two_rank_cmd(29557, RECIPE, overrides)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    digests = dict(re.findall(r"rank (\d)/2 final weights sha256 ([0-9a-f]{16})", log))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], log[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["mismatch/logp_abs_mean"] <= 1e-4 for r in rows), [r["mismatch/logp_abs_mean"] for r in rows]


@needs_vllm
def test_the_proof_report_plays_models_through_the_vllm_sampler(vllm_model_dir: str, tmp_path: Path) -> None:
    """``rltk eval --compare --backend vllm`` on a multi-turn env: the greedy episodes of the HF sampler
    (same tokens, same verdicts) and the sampler named in the report; plain ``rltk eval`` likewise."""
    from rltk.cli import main

    common = ["eval", "--env", "support_refund", "--n", "4", "--max-new-tokens", "12"]
    reports = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        flags = ["--backend", backend, "--vllm-python", str(VLLM_PYTHON)]
        assert (
            main(
                [*common, *flags, "--compare", f"tiny={vllm_model_dir}", "--samples", "0", "--out", str(out)]
            )
            == 0
        )
        reports[backend] = json.loads((out / "report.json").read_text())
        assert main([*common, *flags, "--model", vllm_model_dir, "--out", str(out / "eval.json")]) == 0
        reports[backend + "_eval"] = json.loads((out / "eval.json").read_text())
    hf, vllm = (reports[b]["policies"][0]["greedy"] for b in ("hf", "vllm"))
    assert reports["vllm"]["sampler"] == "vllm" and reports["hf"]["sampler"] == "hf"
    assert hf["generated_tokens"] == vllm["generated_tokens"] and hf["turns"] == vllm["turns"], (hf, vllm)
    assert hf["mean_reward"] == vllm["mean_reward"]
    assert "`vllm` sampler" in (tmp_path / "vllm" / "report.md").read_text()
    assert reports["hf_eval"]["results"][0] == reports["vllm_eval"]["results"][0]
