"""Stage "rollout": sample G completions per task and play them through the env.

    tasks ──render──▶ prompt ids ──sample_turn──▶ G samples per prompt ──env.episode──▶ Group(Rollouts)

:func:`sample_turn` is the engine for one assistant turn. It left-pads the P prompts and prefills all but
each prompt's last token into a KV cache, sharing work at two levels: the token prefix common to all P prompts
(system prompt, written policy; :func:`rltk.forward.shared_prefix_length`) runs once and its cache is expanded
P times, then each prompt's own suffix runs once (not G times); the cache is expanded G times with
``batch_repeat_interleave`` and ``model.generate`` continues from the last prompt token. For this the prompts
are laid out ``prefix | pad | suffix`` (:func:`rltk.forward.shared_prefix_layout`) and ``generate`` gets that
layout's attention mask: it derives position ids as ``cumsum(attention_mask) - 1``, so the padding between
prefix and suffix is skipped and every real token keeps the position it has in the left-padded batch. The
model's forward consumes no randomness in eval mode, so under the same seed the sampled tokens are those of
``model.generate(prompts, num_return_sequences=G, do_sample=True)``, token for token (the logits differ only
by float rounding, as with any change of batch shape).

Generated ids are kept exactly as sampled (no decode/re-encode), cut after the first EOS; the EOS stays in
``token_ids`` and ``loss_mask`` (it is a model action; TRL does the same). ``sample_logp`` is the log-prob
of each token under the processed sampling distribution (after temperature, top-k and top-p, and min-length
EOS suppression): with ``top_k=0``/``top_p=1`` it equals ``forward.completion_logprobs`` at the same
temperature up to float rounding.

Multi-turn envs (``Env.max_turns > 1``) are not supported yet: they will loop ``sample_turn`` over turns
(with ``repeats=1`` on each rollout's own history) and append the env's observation tokens, rendered as
``template(history + observation) - template(history)`` with ``loss_mask`` 0 (:func:`observation_ids`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from rltk.batch import Group, Rollout, left_pad
from rltk.env import Env, Message, Task
from rltk.forward import prefill, shared_prefix_layout, shared_prefix_length
from rltk.models import context_length


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one assistant turn (see :func:`generate`); ``temperature=0`` means greedy decoding."""

    max_new_tokens: int
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class TurnSample:
    """One sampled assistant turn.

    Attributes:
        token_ids: ``[T]`` the generated ids, cut after the first EOS (kept), no padding.
        sample_logp: ``[T]`` log-prob of each token under the processed sampling distribution.
        finished: True if the turn ended with an EOS, False if ``max_new_tokens`` cut it.

    """

    token_ids: torch.Tensor  # [T]
    sample_logp: torch.Tensor  # [T]
    finished: bool


class PromptTooLongError(ValueError):
    """A task's rendered prompt does not fit the model's context (minus the completion budget)."""


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template (plus the generation prompt by default)."""
    out = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if isinstance(out, Mapping):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(t) for t in out]


def observation_ids(
    tokenizer: PreTrainedTokenizerBase, history: Sequence[Message], observation: str
) -> list[int]:
    """Tokens an env observation adds to a conversation (for multi-turn rollouts; loss_mask 0).

    ``template(history + [user: observation], generation prompt) - template(history)``, where ``history`` ends
    with the assistant turn.

    Raises:
        ValueError: If the template does not render ``history`` as a prefix of the longer conversation.

    """
    before = render_prompt(tokenizer, history, add_generation_prompt=False)
    after = render_prompt(tokenizer, [*history, {"role": "user", "content": observation}])
    if after[: len(before)] != before:
        raise ValueError("the chat template does not render the history as a prefix of the next turn")
    return after[len(before) :]


def eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Return the ids that end a turn: the tokenizer's EOS plus the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def check_prompt_length(
    task: Task, n_tokens: int, model: nn.Module, max_new_tokens: int, max_prompt_tokens: int | None
) -> None:
    """Raise :class:`PromptTooLongError` naming the task, its length, the limit and the fix."""
    ctx = context_length(model)
    limit, why = ctx - max_new_tokens, f"model context {ctx} - max_new_tokens {max_new_tokens}"
    if max_prompt_tokens is not None and max_prompt_tokens < limit:
        limit, why = max_prompt_tokens, "max_prompt_tokens"
    if n_tokens > limit:
        raise PromptTooLongError(
            f"task {task.id!r}: its prompt renders to {n_tokens} tokens, over the limit of {limit} ({why}). "
            "Shorten the prompt (the env's messages), or raise the limit (max_prompt_tokens, or a model "
            "with a longer context), or lower rollout.max_new_tokens."
        )


@torch.no_grad()
def sample_turn(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    repeats: int,
    params: SamplingParams,
    eos_ids: Sequence[int],
    pad_id: int,
) -> list[TurnSample]:
    """Sample ``repeats`` continuations of each prompt; prefill the shared prefix once and each prompt once.

    Args:
        model: A causal LM (transformers, optionally peft-wrapped), in eval mode.
        prompts: P unpadded ``[Lp_i]`` id tensors.
        repeats: G, continuations per prompt.
        params: Sampling parameters.
        eos_ids: Ids that end a turn.
        pad_id: Padding id (masked out).

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
    )
    out = model.generate(
        input_ids=ids.repeat_interleave(repeats, 0),  # [P*G, Lp]
        attention_mask=mask.repeat_interleave(repeats, 0),  # [P*G, Lp]: covers prefix, pad, suffix
        past_key_values=cache,
        generation_config=config,
    )
    new = out.sequences[:, lp:]  # [P*G, T]
    logp = torch.stack(
        [s.float().log_softmax(-1).gather(-1, new[:, t, None]).squeeze(-1) for t, s in enumerate(out.scores)],
        dim=1,
    )  # [P*G, T]
    is_eos = torch.isin(new, torch.tensor(list(eos_ids), device=new.device))  # [P*G, T]
    samples = []
    for row in range(new.shape[0]):
        hits = is_eos[row].nonzero()
        finished = len(hits) > 0
        end = int(hits[0]) + 1 if finished else new.shape[1]
        samples.append(TurnSample(new[row, :end].cpu(), logp[row, :end].cpu(), finished))
    return samples


def _finish_single_turn(
    env: Env, task: Task, sample: TurnSample, tokenizer: PreTrainedTokenizerBase
) -> Rollout:
    """Decode one sample, play it as the episode's only turn, and wrap it as a :class:`Rollout`."""
    text = tokenizer.decode(sample.token_ids.tolist(), skip_special_tokens=True)
    episode = env.episode(task)
    step = episode.step(text)
    return Rollout(
        task=task,
        turns=[text],
        token_ids=sample.token_ids,
        loss_mask=torch.ones_like(sample.token_ids),
        sample_logp=sample.sample_logp,
        outcome=dict(episode.outcome),
        truncated=not sample.finished or not step.done,
    )


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    env: Env,
    tasks: Sequence[Task],
    *,
    group_size: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    max_prompt_tokens: int | None = None,
) -> list[Group]:
    """Sample ``group_size`` rollouts of every task and run them through ``env``.

    Args:
        model: A causal LM (transformers, optionally peft-wrapped). Put in eval mode for sampling; its mode
            is restored afterwards.
        tokenizer: Its tokenizer, with a chat template.
        env: The environment (single-turn for now).
        tasks: The P tasks.
        group_size: G, rollouts per task.
        max_new_tokens: Tokens per assistant turn at most (a turn cut there is ``truncated``).
        min_new_tokens: EOS is suppressed before this many tokens.
        temperature: Sampling temperature (> 0).
        top_p: Nucleus sampling threshold (1 = off).
        top_k: Top-k sampling (0 = off).
        seed: Seeds the sampling (the global RNG state is restored afterwards); ``None`` uses the global RNG.
        max_prompt_tokens: Longest prompt allowed, besides the model's context minus ``max_new_tokens``.

    Returns:
        One :class:`Group` per task, in order, each with G rollouts (rewards not scored yet).

    Raises:
        ValueError: For bad sampling arguments or a prompt over the length limit (the message names the task).
        NotImplementedError: For multi-turn envs.

    """
    if env.max_turns > 1:
        name = getattr(env, "name", type(env).__name__)
        raise NotImplementedError(
            f"env '{name}' has max_turns={env.max_turns}: multi-turn rollouts are not implemented yet "
            "(rltk.rollout.sample_turn is the per-turn engine they will use); use a single-turn env"
        )
    if group_size < 1 or max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            f"need group_size >= 1, max_new_tokens >= 1 and 0 <= min_new_tokens <= max_new_tokens; got "
            f"{group_size}, {max_new_tokens}, {min_new_tokens}"
        )
    if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"need temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}"
        )
    if not tasks:
        return []
    prompts = []
    for task in tasks:
        ids = render_prompt(tokenizer, task.messages)
        check_prompt_length(task, len(ids), model, max_new_tokens, max_prompt_tokens)
        prompts.append(torch.tensor(ids, dtype=torch.long))
    params = SamplingParams(max_new_tokens, min_new_tokens, temperature, top_p, top_k)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = model.get_input_embeddings().weight.device
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            samples = sample_turn(model, prompts, group_size, params, eos_ids, pad_id)
    finally:
        model.train(was_training)
    groups = []
    for i, (task, prompt) in enumerate(zip(tasks, prompts, strict=True)):
        rows = samples[i * group_size : (i + 1) * group_size]
        rollouts = [_finish_single_turn(env, task, s, tokenizer) for s in rows]
        groups.append(Group(task=task, prompt_ids=prompt, rollouts=rollouts))
    return groups
