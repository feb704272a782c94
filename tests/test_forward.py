"""The shared-prompt forward (kv, packed) equals the plain forward: same log-probs, same gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from rltk.batch import Batch
from rltk.forward import completion_logprobs, packed_attention_mask

PROMPT_LENS = [9, 14, 5]  # ragged: left padding
COMPLETION_LENS = [[6, 1, 3, 6], [2, 6, 4, 5], [6, 6, 1, 2]]  # ragged: right padding, incl. length 1
G = 4
LOGP_ATOL = 1e-5
GRAD_RTOL = 1e-4


def make_batch(pad_id: int, vocab: int = 2000, seed: int = 0) -> Batch:
    """P=3 ragged prompts, G=4 ragged completions each, random ids; padding uses ``pad_id``."""
    gen = torch.Generator().manual_seed(seed)
    p, lp = len(PROMPT_LENS), max(PROMPT_LENS)
    lc = max(max(r) for r in COMPLETION_LENS)
    prompt_ids = torch.full((p, lp), pad_id)
    prompt_mask = torch.zeros((p, lp), dtype=torch.long)
    completion_ids = torch.full((p * G, lc), pad_id)
    completion_mask = torch.zeros((p * G, lc), dtype=torch.long)
    for i, n in enumerate(PROMPT_LENS):
        prompt_ids[i, lp - n :] = torch.randint(3, vocab, (n,), generator=gen)
        prompt_mask[i, lp - n :] = 1
        for j, k in enumerate(COMPLETION_LENS[i]):
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


def test_kv_gradients_reach_the_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    """A loss on completion tokens 1.. (not token 0, whose logits come from the prompt pass) reaches the
    prompt pass only through the expanded KV cache: its input embeddings must get a gradient."""
    model = make_tiny_model(tokenizer)
    batch = make_batch(tokenizer.pad_token_id)
    captured: list[torch.Tensor] = []

    def keep_first(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        if not captured:  # the first embedding call is the prompt pass
            output.retain_grad()
            captured.append(output)

    handle = model.get_input_embeddings().register_forward_hook(keep_first)
    logp = completion_logprobs(model, batch, mode="kv")
    handle.remove()
    (logp[:, 1:] * batch.completion_mask[:, 1:]).sum().backward()
    prompt_grad = captured[0].grad  # [P, Lp, H]
    assert prompt_grad.shape[:2] == batch.prompt_ids.shape
    assert (prompt_grad.abs().sum(-1)[batch.prompt_mask == 1] > 0).all()


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
