"""Stage "sampler": what generates tokens for rollouts and evals, behind one seam.

    rollout.generate ──prompt ids [Lp_i], repeats G, SamplingParams──▶ Sampler.sample ──▶ P*G TurnSamples
    trainer, after each optimizer step ──▶ Sampler.push_weights(policy)

A :class:`Sampler` returns, per continuation, exactly the sampled token ids (cut after the first EOS, which is
kept, or after the token that completes a stop string) and their log-probs under the *processed* sampling
distribution (after temperature, top-k and top-p): the distribution the tokens were drawn from. Rollouts
(single- and multi-turn), held-out evals and the proof report all sample through it; none of them touches a
model. Randomness comes from torch's global RNG (which :func:`rltk.rollout.generate` seeds), so a seeded
run samples the same tokens again, whichever sampler it uses.

:class:`HFSampler` is transformers' ``generate`` on the training module itself (no weights to push). It
left-pads the P prompts and prefills all but each prompt's last token into a KV cache, sharing work at two
levels: the token prefix common to all P prompts (system prompt, written policy;
:func:`rltk.prefix.shared_prefix_length`) runs once and its cache is expanded P times, then each prompt's
own suffix runs once (not G times); the cache is expanded G times with ``batch_repeat_interleave`` and
``model.generate`` continues from the last prompt token. For this the prompts are laid out
``prefix | pad | suffix`` (:func:`rltk.prefix.shared_prefix_layout`) and ``generate`` gets that layout's
attention mask: it derives position ids as ``cumsum(attention_mask) - 1``, so the padding between prefix and
suffix is skipped and every real token keeps the position it has in the left-padded batch. The model's
forward consumes no randomness in eval mode, so under the same seed the sampled tokens are those of
``model.generate(prompts, num_return_sequences=G, do_sample=True)``, token for token (the logits differ only
by float rounding, as with any change of batch shape). With ``top_k=0``/``top_p=1`` its ``sample_logp``
equals :func:`rltk.forward.completion_logprobs` at the same temperature up to float rounding.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from rltk.batch import left_pad
from rltk.models import context_length
from rltk.prefix import prefill, shared_prefix_layout, shared_prefix_length


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one assistant turn (see :func:`generate`); ``temperature=0`` means greedy decoding."""

    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: tuple[str, ...] = ()  # a turn also ends once its text contains one of these


@dataclass
class TurnSample:
    """One sampled assistant turn.

    Attributes:
        token_ids: ``[T]`` the generated ids, cut after the first EOS (kept), no padding.
        sample_logp: ``[T]`` log-prob of each token under the processed sampling distribution.
        finished: True if the turn ended with an EOS or a stop string, False if ``max_new_tokens`` cut it.

    """

    token_ids: torch.Tensor  # [T]
    sample_logp: torch.Tensor  # [T]
    finished: bool


def eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Return the ids that end a turn: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample_turn(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    repeats: int,
    params: SamplingParams,
    eos_ids: Sequence[int],
    pad_id: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[TurnSample]:
    """Sample ``repeats`` continuations of each prompt; prefill the shared prefix once and each prompt once.

    Args:
        model: A causal LM (transformers, optionally peft-wrapped), in eval mode.
        prompts: P unpadded ``[Lp_i]`` id tensors.
        repeats: G, continuations per prompt.
        params: Sampling parameters.
        eos_ids: Ids that end a turn.
        pad_id: Padding id (masked out).
        tokenizer: Needed only with ``params.stop_strings``.

    Returns:
        P*G samples; those of prompt ``i`` are at ``i*G .. i*G+G-1``.

    """
    device = model.get_input_embeddings().weight.device
    ids, mask = left_pad(list(prompts), pad_id)  # [P, Lp]
    ids, mask, lp = ids.to(device), mask.to(device), ids.shape[1]
    c = shared_prefix_length(ids, mask)
    ids, mask = shared_prefix_layout(ids, mask, c)  # [P, Lp]: prefix | pad | suffix
    _, cache = prefill(model, ids[:, :-1], mask[:, :-1], c)  # all but the last token; generate feeds it
    if cache is not None:
        cache.batch_repeat_interleave(repeats)  # [P, ...] -> [P*G, ...]
    greedy = params.temperature == 0
    config = GenerationConfig(
        do_sample=not greedy,
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=params.min_new_tokens,
        temperature=None if greedy else params.temperature,
        top_p=None if greedy else params.top_p,
        top_k=None if greedy else params.top_k,
        repetition_penalty=1.0,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        return_dict_in_generate=True,
        output_scores=True,
        disable_compile=True,
        stop_strings=list(params.stop_strings) or None,
    )
    if params.stop_strings and tokenizer is None:
        raise ValueError("sample_turn needs the tokenizer to stop at stop_strings")
    out = model.generate(
        input_ids=ids.repeat_interleave(repeats, 0),  # [P*G, Lp]
        attention_mask=mask.repeat_interleave(repeats, 0),  # [P*G, Lp]: covers prefix, pad, suffix
        cache=cache,
        generation_config=config,
        **({"tokenizer": tokenizer} if params.stop_strings else {}),
    )
    new = out.sequences[:, lp:]  # [P*G, T]
    logp = torch.stack(
        [s.float().log_softmax(-1).gather(-1, new[:, t, None]).squeeze(-1) for t, s in enumerate(out.scores)],
        dim=1,
    )  # [P*G, T]
    samples = []
    for row in range(new.shape[0]):
        end, finished = cut_turn(new[row].tolist(), eos_ids, tokenizer, params.stop_strings)
        samples.append(TurnSample(new[row, :end].cpu(), logp[row, :end].cpu(), finished))
    return samples


def cut_turn(
    ids: Sequence[int],
    eos_ids: Collection[int],
    tokenizer: PreTrainedTokenizerBase | None,
    stop_strings: Sequence[str],
) -> tuple[int, bool]:
    """Where a sampled turn ends, the same for every sampler: ``(its length, whether it finished)``.

    Through the first EOS (kept), then at the first stop string (:func:`stop_string_end`; only with a
    tokenizer). Neither: the whole of ``ids``, unfinished (the token budget ran out).

    >>> cut_turn([5, 6, 2, 7], eos_ids={2}, tokenizer=None, stop_strings=())
    (3, True)
    >>> cut_turn([5, 6], eos_ids={2}, tokenizer=None, stop_strings=())
    (2, False)
    """
    end = next((i + 1 for i, token in enumerate(ids) if token in eos_ids), None)
    finished = end is not None
    end = end or len(ids)
    if stop_strings and tokenizer is not None:
        stop = stop_string_end(list(ids[:end]), tokenizer, stop_strings)
        if stop is not None:
            return stop, True
    return end, finished


def stop_string_end(
    ids: list[int], tokenizer: PreTrainedTokenizerBase, stop_strings: Sequence[str]
) -> int | None:
    """Length of the shortest prefix of ``ids`` whose text contains a stop string (None: no stop string).

    The token that completes the stop string is kept whole, even where it carries text past it.
    """

    def hit(n: int) -> bool:
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    if not ids or not hit(len(ids)):
        return None
    lo, hi = 1, len(ids)  # containment is monotone in the prefix length: binary search
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
    return lo


@dataclass(frozen=True)
class SamplerLimits:
    """What rollouts need to know of the model behind a sampler."""

    context_length: int  # prompt + completion tokens at most
    eos_ids: tuple[int, ...]  # ids that end a turn
    pad_id: int


class Sampler(Protocol):
    """Generates assistant turns: the seam between rollouts and a generation engine (HF, vLLM)."""

    limits: SamplerLimits

    def sample(
        self, prompts: Sequence[torch.Tensor], repeats: int, params: SamplingParams
    ) -> list[TurnSample]:
        """``repeats`` (G) continuations of each of the P unpadded ``[Lp_i]`` prompts.

        Returns P*G samples, those of prompt ``i`` at ``i*G .. i*G+G-1``. Randomness comes from torch's
        global RNG.
        """
        ...

    def push_weights(self, model: nn.Module) -> None:
        """Make the sampler generate with ``model``'s current weights (after an optimizer step)."""
        ...

    def close(self) -> None:
        """Release the engine (idempotent)."""
        ...


class HFSampler:
    """transformers ``generate`` on the policy module itself, prompts prefilled once (module docstring).

    Args:
        model: A causal LM (transformers, optionally peft-wrapped). Put in eval mode while it samples; its
            mode is restored afterwards.
        tokenizer: Its tokenizer (EOS and padding ids; stop strings).

    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer
        eos_ids = eos_token_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        self.limits = SamplerLimits(context_length(model), tuple(eos_ids), pad_id)

    def sample(
        self, prompts: Sequence[torch.Tensor], repeats: int, params: SamplingParams
    ) -> list[TurnSample]:
        """See :meth:`Sampler.sample`."""
        was_training = self.model.training
        self.model.eval()
        try:
            return sample_turn(
                self.model, prompts, repeats, params, self.limits.eos_ids, self.limits.pad_id, self.tokenizer
            )
        finally:
            self.model.train(was_training)

    def push_weights(self, model: nn.Module) -> None:
        """Nothing to do: this sampler generates with the training module itself."""
        del model

    def close(self) -> None:
        """Nothing to release."""


def vllm_options(backend: str, kv_cache_gib: float, python: str | None) -> dict[str, Any]:
    """:func:`make_sampler`'s ``options`` from a recipe's ``rollout.vllm_*`` or ``rltk eval``'s ``--vllm-*``.

    None for ``backend`` ``hf``; ``python`` is left out when unset (the sampler's default venv).

    >>> vllm_options("vllm", 0.5, None), vllm_options("hf", 0.5, "/venv/bin/python")
    ({'kv_cache_gib': 0.5}, {})
    """
    if backend != "vllm":
        return {}
    return {"kv_cache_gib": kv_cache_gib, **({"python": python} if python else {})}


def make_sampler(
    backend: str, model: nn.Module, tokenizer: PreTrainedTokenizerBase, **options: object
) -> Sampler:
    """The sampler ``rollout.backend`` names: ``"hf"`` (:class:`HFSampler`) or ``"vllm"``.

    ``options`` go to :class:`rltk.vllm_sampler.VLLMSampler` (``python``, ``dtype``, ...).
    """
    if backend == "hf":
        return HFSampler(model, tokenizer)
    if backend == "vllm":
        from rltk.vllm_sampler import VLLMSampler  # only runs with the vLLM venv set up

        return VLLMSampler(model, tokenizer, **options)
    raise ValueError(f"unknown sampler backend {backend!r}; use hf or vllm")
