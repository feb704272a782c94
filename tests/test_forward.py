"""The shared-prompt forward (kv, packed) equals the plain forward: same log-probs, same gradients; kv also
with a prefix shared by all prompts of the batch (run once), and its fallback when there is none."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedTokenizerBase

from rltk import forward
from rltk.batch import Batch
from rltk.forward import completion_logprobs, completion_scores, packed_attention_mask
from rltk.prefix import MIN_SHARED_PREFIX, prompt_positions, shared_prefix_layout, shared_prefix_length

PROMPT_LENS = [9, 14, 5]  # ragged: left padding
PREFIX_LEN = 40  # the common prefix of make_batch(prefix_len=...): longer than MIN_SHARED_PREFIX
SUFFIX_LENS = [9, 14, 1]  # ragged suffixes after it, incl. a prompt whose only own token is its last
COMPLETION_LENS = [[6, 1, 3, 6], [2, 6, 4, 5], [6, 6, 1, 2]]  # ragged: right padding, incl. length 1
G = 4
LOGP_ATOL = 1e-5
GRAD_RTOL = 1e-4


def make_batch(
    pad_id: int, vocab: int = 2000, seed: int = 0, prefix_len: int = 0, completion_lens: list | None = None
) -> Batch:
    """P=3 ragged prompts, G=4 ragged completions each, random ids; padding uses ``pad_id``.

    With ``prefix_len`` > 0 the prompts are a common random prefix of that length plus ``SUFFIX_LENS`` own
    tokens; otherwise ``PROMPT_LENS`` random tokens (no common prefix).
    """
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=gen)
    lens = [prefix_len + n for n in SUFFIX_LENS] if prefix_len else PROMPT_LENS
    completion_lens = completion_lens or COMPLETION_LENS
    p, lp = len(lens), max(lens)
    lc = max(max(r) for r in completion_lens)
    prompt_ids = torch.full((p, lp), pad_id)
    prompt_mask = torch.zeros((p, lp), dtype=torch.long)
    completion_ids = torch.full((p * G, lc), pad_id)
    completion_mask = torch.zeros((p * G, lc), dtype=torch.long)
    for i, n in enumerate(lens):
        own = torch.randint(3, vocab, (n - prefix_len,), generator=gen)
        prompt_ids[i, lp - n :] = torch.cat([prefix, own])
        prompt_mask[i, lp - n :] = 1
        for j, k in enumerate(completion_lens[i]):
            completion_ids[i * G + j, :k] = torch.randint(3, vocab, (k,), generator=gen)
            completion_mask[i * G + j, :k] = 1
    return Batch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        loss_mask=completion_mask.float(),
        advantages=torch.zeros(p * G),
        group_size=G,
    )


def embedding_inputs(model: nn.Module) -> tuple[list[tuple[int, ...]], list[torch.Tensor], RemovableHandle]:
    """Record the input shape and (grad-retaining) output of every embedding call; also the hook's handle."""
    shapes: list[tuple[int, ...]] = []
    outputs: list[torch.Tensor] = []

    def record(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        shapes.append(tuple(inputs[0].shape))
        if output.requires_grad:
            output.retain_grad()
        outputs.append(output)

    return shapes, outputs, model.get_input_embeddings().register_forward_hook(record)


def lora_model(tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """The tiny model with LoRA on every projection, B initialised nonzero so gradients are non-trivial."""
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(tokenizer)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=modules))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.05)
    return model


def logp_and_grads(model: nn.Module, batch: Batch, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Log-probs and the gradient of ``sum(logp * w * mask)`` (fixed random ``w``) per trainable parameter."""
    model.zero_grad(set_to_none=True)
    logp = completion_logprobs(model, batch, temperature=0.7, mode=mode)  # [N, Lc]
    weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(3))
    (logp * weights * batch.completion_mask).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logp.detach(), grads


def assert_same(ref: tuple, got: tuple) -> tuple[float, float]:
    """Check log-probs (max-abs) and every gradient (max-abs diff / max-abs ref); return both maxima."""
    (ref_logp, ref_grads), (logp, grads) = ref, got
    assert logp.shape == ref_logp.shape
    logp_diff = (logp - ref_logp).abs().max().item()
    assert logp_diff < LOGP_ATOL, logp_diff
    assert grads.keys() == ref_grads.keys()
    worst = 0.0
    for name, ref_g in ref_grads.items():
        scale = ref_g.abs().max().item()
        assert scale > 0, f"{name} got no gradient: the test would be vacuous"
        rel = (grads[name] - ref_g).abs().max().item() / scale
        assert rel < GRAD_RTOL, (name, rel)
        worst = max(worst, rel)
    return logp_diff, worst


@pytest.mark.parametrize("mode", ["kv", "packed"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_equals_plain(tokenizer: PreTrainedTokenizerBase, mode: str, attn: str) -> None:
    model = make_tiny_model(tokenizer)
    model.set_attn_implementation(attn)
    batch = make_batch(tokenizer.pad_token_id)
    ref = logp_and_grads(model, batch, "off")
    assert (ref[0][batch.completion_mask == 0] == 0).all()
    assert ref[0][batch.completion_mask == 1].lt(0).all()
    diffs = assert_same(ref, logp_and_grads(model, batch, mode))
    print(f"{mode}/{attn}: max |dlogp| {diffs[0]:.2e}, max grad rel diff {diffs[1]:.2e}")


@pytest.mark.parametrize("mode", ["kv", "packed"])
def test_shared_prompt_equals_plain_lora(tokenizer: PreTrainedTokenizerBase, mode: str) -> None:
    model = lora_model(tokenizer)
    batch = make_batch(tokenizer.pad_token_id)
    ref = logp_and_grads(model, batch, "off")
    assert all("lora_" in n for n in ref[1])
    diffs = assert_same(ref, logp_and_grads(model, batch, mode))
    print(f"lora {mode}: max |dlogp| {diffs[0]:.2e}, max grad rel diff {diffs[1]:.2e}")


@pytest.mark.parametrize("lora", [False, True])
def test_packed_with_gradient_checkpointing(tokenizer: PreTrainedTokenizerBase, lora: bool) -> None:
    model = lora_model(tokenizer) if lora else make_tiny_model(tokenizer)
    batch = make_batch(tokenizer.pad_token_id)
    model.train()  # dropout is 0 in the tiny config: train mode is deterministic
    ref = logp_and_grads(model, batch, "off")
    model.activation_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    diffs = assert_same(ref, logp_and_grads(model, batch, "packed"))
    print(f"packed+checkpointing (lora={lora}): {diffs[0]:.2e}, {diffs[1]:.2e}")
    with pytest.raises(ValueError, match="packed"):
        completion_logprobs(model, batch, mode="kv")
    model.eval()  # checkpointing is inactive in eval mode: kv is allowed again
    completion_logprobs(model, batch, mode="kv")


@pytest.mark.parametrize("prefix_len", [0, PREFIX_LEN], ids=["no_prefix", "shared_prefix"])
def test_kv_gradients_reach_the_prompt(tokenizer: PreTrainedTokenizerBase, prefix_len: int) -> None:
    """A loss on completion tokens 1.. (not token 0, whose logits come from the prompt pass) reaches the
    prompt passes only through the expanded KV caches: the input embeddings of every real prompt token (the
    shared prefix's, run once, included) must get a gradient."""
    model = make_tiny_model(tokenizer)
    batch = make_batch(tokenizer.pad_token_id, prefix_len=prefix_len)
    _, outputs, handle = embedding_inputs(model)
    logp = completion_logprobs(model, batch, mode="kv")
    handle.remove()
    (logp[:, 1:] * batch.completion_mask[:, 1:]).sum().backward()
    ids, mask = shared_prefix_layout(batch.prompt_ids, batch.prompt_mask, prefix_len)
    prompt_passes = outputs[:-1]  # [prefix [1, C]], prompts or suffixes [P, Lp - C]; then the completions
    assert len(prompt_passes) == (2 if prefix_len else 1)
    grads = torch.cat([x.grad.expand(ids.shape[0], -1, -1) for x in prompt_passes], dim=1)  # [P, Lp, H]
    assert grads.shape[:2] == ids.shape
    assert (grads.abs().sum(-1)[mask == 1] > 0).all()


def test_shared_prefix_length_and_layout() -> None:
    pad = 0
    ids = torch.tensor([[pad, pad, 5, 6, 7, 8], [5, 6, 7, 9, 1, 2], [pad, 5, 6, 7, 8, 3]])  # [P=3, Lp=6]
    mask = (ids != pad).long()
    assert shared_prefix_length(ids, mask, min_length=2) == 3  # 5 6 7, then 8 / 9 / 8
    assert shared_prefix_length(ids, mask, min_length=4) == 0  # below the threshold: not worth a pass
    assert shared_prefix_length(ids[:1], mask[:1], min_length=1) == 0  # one prompt: nothing to share
    same = torch.tensor([[pad, 5, 6, 7], [pad, 5, 6, 7], [5, 6, 7, 7]])
    assert shared_prefix_length(same, (same != pad).long(), min_length=1) == 2  # each prompt keeps a token
    new_ids, new_mask = shared_prefix_layout(ids, mask, 3)
    assert new_ids.tolist() == [[5, 6, 7, pad, pad, 8], [5, 6, 7, 9, 1, 2], [5, 6, 7, pad, 8, 3]]
    assert new_mask.tolist() == [[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]]
    positions = prompt_positions(new_mask)  # as generate derives them: padding skipped
    assert positions[new_mask == 1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    same_ids, same_mask = shared_prefix_layout(ids, mask, 0)  # C=0: the left-padded layout itself
    assert same_ids is ids and same_mask is mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_kv_shared_prefix_equals_plain(tokenizer: PreTrainedTokenizerBase, lora: bool, attn: str) -> None:
    """A prefix common to all prompts runs once ([1, C]), the suffixes once ([P, Lp-C]), then the
    completions: log-probs and every parameter gradient equal the plain forward's."""
    model = lora_model(tokenizer) if lora else make_tiny_model(tokenizer)
    model.set_attn_implementation(attn)
    batch = make_batch(tokenizer.pad_token_id, seed=5, prefix_len=PREFIX_LEN)
    assert (
        shared_prefix_length(batch.prompt_ids, batch.prompt_mask) == PREFIX_LEN
    )  # capped by the 1-token one
    ref = logp_and_grads(model, batch, "off")
    shapes, _, handle = embedding_inputs(model)
    got = logp_and_grads(model, batch, "kv")
    handle.remove()
    (p, lp), (n, lc) = batch.prompt_ids.shape, batch.completion_ids.shape
    assert shapes == [(1, PREFIX_LEN), (p, lp - PREFIX_LEN), (p, n // p * (lc - 1))]  # G completions per row
    diffs = assert_same(ref, got)
    print(f"kv shared prefix ({'lora' if lora else 'plain'}/{attn}): {diffs[0]:.2e}, {diffs[1]:.2e}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prefix_len", [0, PREFIX_LEN], ids=["no_prefix", "shared_prefix"])
def test_kv_separate_rows_equal_plain(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch, prefix_len: int, attn: str
) -> None:
    """Long completions (multi-turn episodes) run one row each on a G-fold copy of the prompt's cache: the
    completion pass is ``[P*G, Lc-1]``, and log-probs and gradients equal the plain forward's."""
    monkeypatch.setattr(forward, "SEPARATE_ROWS_FROM", 2)  # this batch's Lc-1 = 5 counts as long
    model = lora_model(tokenizer)
    model.set_attn_implementation(attn)
    batch = make_batch(tokenizer.pad_token_id, seed=7, prefix_len=prefix_len)
    ref = logp_and_grads(model, batch, "off")
    shapes, _, handle = embedding_inputs(model)
    got = logp_and_grads(model, batch, "kv")
    handle.remove()
    (p, lp), (n, lc) = batch.prompt_ids.shape, batch.completion_ids.shape
    prompt_passes = [(1, PREFIX_LEN), (p, lp - PREFIX_LEN)] if prefix_len else [(p, lp)]
    assert shapes == [*prompt_passes, (n, lc - 1)]
    diffs = assert_same(ref, got)
    print(f"kv separate rows ({prefix_len=}, {attn}): {diffs[0]:.2e}, {diffs[1]:.2e}")


@pytest.mark.parametrize("prefix_len", [0, MIN_SHARED_PREFIX - 1], ids=["none", "short"])
def test_kv_without_shared_prefix_falls_back(tokenizer: PreTrainedTokenizerBase, prefix_len: int) -> None:
    """No common prefix, or one below MIN_SHARED_PREFIX: the prompts run whole ([P, Lp]), one pass."""
    model = lora_model(tokenizer)
    batch = make_batch(tokenizer.pad_token_id, prefix_len=prefix_len)
    assert shared_prefix_length(batch.prompt_ids, batch.prompt_mask) == 0
    ref = logp_and_grads(model, batch, "off")
    shapes, _, handle = embedding_inputs(model)
    got = logp_and_grads(model, batch, "kv")
    handle.remove()
    (p, _), (n, lc) = batch.prompt_ids.shape, batch.completion_ids.shape
    assert shapes == [tuple(batch.prompt_ids.shape), (p, n // p * (lc - 1))]
    diffs = assert_same(ref, got)
    print(f"kv fallback ({prefix_len=}): {diffs[0]:.2e}, {diffs[1]:.2e}")


def test_kv_shared_prefix_single_token_completions(tokenizer: PreTrainedTokenizerBase) -> None:
    """Lc=1: the logits come from the suffix pass alone (no completion pass)."""
    model = make_tiny_model(tokenizer)
    batch = make_batch(tokenizer.pad_token_id, prefix_len=PREFIX_LEN, completion_lens=[[1] * G] * 3)
    assert_same(logp_and_grads(model, batch, "off"), logp_and_grads(model, batch, "kv"))


def test_kv_shared_prefix_groups_of_one(tokenizer: PreTrainedTokenizerBase) -> None:
    """G=1 (the warm start's demonstrations): the prefix is still shared across the P prompts."""
    model = make_tiny_model(tokenizer)
    full = make_batch(tokenizer.pad_token_id, prefix_len=PREFIX_LEN)
    rows = torch.arange(0, full.completion_ids.shape[0], G)  # the first completion of each group
    batch = Batch(
        prompt_ids=full.prompt_ids,
        prompt_mask=full.prompt_mask,
        completion_ids=full.completion_ids[rows],
        completion_mask=full.completion_mask[rows],
        loss_mask=full.loss_mask[rows],
        advantages=full.advantages[rows],
        group_size=1,
    )
    assert_same(logp_and_grads(model, batch, "off"), logp_and_grads(model, batch, "kv"))


def test_packed_mask_blocks() -> None:
    prompt_mask = torch.tensor([[0, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # G=2, Lc=3 -> blocks of Lc-1=2
    m = packed_attention_mask(prompt_mask, completion_mask, 2)[0, 0].int()
    expected = torch.tensor(
        [  # keys: pad p1 p2 | c1_0 c1_1 | c2_0 c2_1
            [1, 0, 0, 0, 0, 0, 0],  # pad: only itself
            [0, 1, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0, 0],
            [0, 1, 1, 1, 0, 0, 0],
            [0, 1, 1, 1, 1, 0, 0],
            [0, 1, 1, 0, 0, 1, 0],  # second completion never sees the first
            [0, 1, 1, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(m, expected)


def test_bad_arguments(tokenizer: PreTrainedTokenizerBase) -> None:
    model = make_tiny_model(tokenizer)
    batch = make_batch(tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="unknown shared-prompt mode"):
        completion_logprobs(model, batch, mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, batch, temperature=0.0)
    batch.group_size = 3
    with pytest.raises(ValueError, match="P\\*G"):
        completion_logprobs(model, batch)


def test_entropy_is_the_next_token_distributions_and_its_bonus_enters_the_loss(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """completion_scores' entropy equals -Σ p log p of the plain forward's next-token distributions; with
    entropy_coef c the loss is the plain loss minus c times the aggregated entropy (and so are gradients)."""
    from rltk.config import AlgorithmConfig
    from rltk.loss import normalizer_for, policy_loss

    model = lora_model(tokenizer)
    batch = make_batch(tokenizer.pad_token_id, seed=2)
    batch.advantages = torch.randn(batch.completion_ids.shape[0], generator=torch.Generator().manual_seed(0))
    scores = completion_scores(model, batch, temperature=0.7, mode="kv", entropy=True, entropy_grad=True)
    p, g = batch.num_prompts, batch.group_size
    rows = []
    for i in range(p * g):  # the plain forward, one row at a time
        prompt = batch.prompt_ids[i // g][batch.prompt_mask[i // g].bool()]
        ids = torch.cat([prompt, batch.completion_ids[i]])[None]
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / 0.7
        lp = logits.log_softmax(-1)
        rows.append(-(lp.exp() * lp).sum(-1) * batch.completion_mask[i])
    want = torch.stack(rows)  # [N, Lc]
    assert (scores.entropy - want).abs().max() < 1e-4
    metric = completion_scores(model, batch, temperature=0.7, mode="kv", entropy=True).entropy  # no graph
    assert not metric.requires_grad and torch.allclose(metric, scores.entropy.detach(), atol=1e-6)
    for aggregation in ("token_mean", "seq_mean"):
        norm = normalizer_for([batch], aggregation, batch.completion_ids.shape[1])
        off = policy_loss(scores.logp, batch, AlgorithmConfig(aggregation=aggregation).resolved(), norm)
        cfg = AlgorithmConfig(aggregation=aggregation, entropy_coef=0.05).resolved()
        on = policy_loss(scores.logp, batch, cfg, norm, entropy=scores.entropy)
        m = batch.loss_mask
        h = (
            (scores.entropy * m).sum()
            if aggregation == "token_mean"
            else ((scores.entropy * m).sum(-1) / m.sum(-1)).sum()
        )
        assert torch.allclose(on.loss, off.loss - 0.05 * h / norm, atol=1e-6)
        assert on.metrics["loss/entropy_mean"] > 0
    with pytest.raises(ValueError, match="entropy_coef > 0 needs the entropies"):
        policy_loss(scores.logp, batch, cfg, norm)
