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

Multi-turn envs (``Env.max_turns > 1``, tool use): every rollout plays its own episode. After each turn the
env answers; its observation is appended as tokens the model did not generate (``loss_mask`` 0,
``sample_logp`` 0): the turn's closing tokens where the model did not write them (a turn cut at a stop string
or at ``max_new_tokens``; :func:`rltk.chat.turn_close_ids`), then ``template(history + [user: observation],
generation prompt) - template(history)`` (:func:`rltk.chat.observation_ids`, checked to be a prefix; with
native tool calling a ``tool`` turn, and the task's tool schemas rendered throughout). The next
turn is sampled with ``repeats=1`` from each live rollout's prompt + completion so far, exactly the ids the
update will see: the model's ids as generated (never re-tokenized, even where a stop string ends mid-token)
and the env's rendered ids. Each rollout's sequence is contiguous, so sampling (``cumsum(mask) - 1`` over a
left-padded batch) and training (contiguous positions after the prompt) give every token the same position id,
and the update's log-probs equal the sampler's up to float rounding (``tests/test_multiturn.py``). Each turn
re-prefills the rollouts' histories (sharing the prefix common to all of them), which costs prompt compute but
keeps one code path for sampling. A rollout ends when the env says done (``stop_reason="done"``), after
``max_turns`` turns (``"max_turns"``), or when its tokens reach ``max_rollout_tokens`` (``"max_tokens"``); the
last two are ``truncated`` and keep the env's verdict of an unfinished episode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from rltk.batch import Failure, Group, Rollout, left_pad
from rltk.chat import env_answer_ids, render_prompt, turn_close_ids
from rltk.deadline import CallTimeout, call_with_timeout
from rltk.env import Env, Episode, Message, Step, Task
from rltk.forward import prefill, shared_prefix_layout, shared_prefix_length
from rltk.models import context_length

ENV_TIMEOUT_S = 30.0
"""Default deadline of one episode step (the env's tools and check), as ``rollout.env_timeout_s``."""


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


class PromptTooLongError(ValueError):
    """A task's rendered prompt does not fit the model's context (minus the completion budget)."""


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
    is_eos = torch.isin(new, torch.tensor(list(eos_ids), device=new.device))  # [P*G, T]
    samples = []
    for row in range(new.shape[0]):
        hits = is_eos[row].nonzero()
        finished = len(hits) > 0
        end = int(hits[0]) + 1 if finished else new.shape[1]
        if params.stop_strings and tokenizer is not None:
            stop = stop_string_end(new[row, :end].tolist(), tokenizer, params.stop_strings)
            if stop is not None:
                end, finished = stop, True
        samples.append(TurnSample(new[row, :end].cpu(), logp[row, :end].cpu(), finished))
    return samples


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


def cut_at_stop_string(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the end of its first stop string (what the env sees of a turn).

    >>> cut_at_stop_string("<tool>a: b</tool>xyz", ["</tool>", "</answer>"])
    '<tool>a: b</tool>'
    """
    ends = [text.find(s) + len(s) for s in stop_strings if s in text]
    return text[: min(ends)] if ends else text


@dataclass
class RolloutState:
    """One rollout while it is played: its own episode, conversation and tokens so far."""

    task: Task
    episode: Episode
    prompt_ids: list[int]  # [Lp]
    budget: int  # most completion tokens (model + env) this rollout may hold
    messages: list[Message]
    turns: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # [L] completion so far, model and env tokens
    loss_mask: list[int] = field(default_factory=list)  # [L] 1 = generated by the model
    sample_logp: list[float] = field(default_factory=list)  # [L] 0 for env tokens
    stop_reason: str = ""  # "" while live, then "done" | "max_turns" | "max_tokens" | "env_failed"
    last_turn_finished: bool = True
    failures: list[Failure] = field(default_factory=list)  # the env's step raised or hung

    def to_rollout(self) -> Rollout:
        """The finished rollout (a rollout still live here ran out of turns)."""
        reason = self.stop_reason or "max_turns"
        return Rollout(
            task=self.task,
            turns=list(self.turns),
            token_ids=torch.tensor(self.token_ids, dtype=torch.long),
            loss_mask=torch.tensor(self.loss_mask, dtype=torch.long),
            sample_logp=torch.tensor(self.sample_logp, dtype=torch.float32),
            outcome=dict(self.episode.outcome),
            truncated=reason != "done" or not self.last_turn_finished,
            stop_reason=reason,
            failures=list(self.failures),
        )


@dataclass(frozen=True)
class TurnContext:
    """What playing a turn needs besides the rollout: the tokenizer and the turn-closing ids."""

    tokenizer: PreTrainedTokenizerBase
    eos_ids: frozenset[int]
    close_ids: list[int]  # the template's tokens after an assistant turn's text (multi-turn only)
    stop_strings: tuple[str, ...]
    env_timeout_s: float | None = None  # deadline of one episode step (tools, check); None = unguarded


def guarded_step(episode: Episode, text: str, timeout_s: float | None = ENV_TIMEOUT_S) -> Step | Failure:
    """``episode.step(text)``, or the env's :class:`Failure` if it raised or ran past ``timeout_s``.

    ``timeout_s`` ``None`` sets no deadline. Env tools and checks run model-driven code in the trainer: a
    stuck episode must become a failed rollout (it leaves the update), not a hung run.
    """
    try:
        if timeout_s is None:
            return episode.step(text)
        return call_with_timeout(episode.step, (text,), {}, timeout_s)
    except CallTimeout as e:
        return Failure("env", "timeout", f"episode step {e}")
    except Exception as e:  # an env bug on this output; KeyboardInterrupt propagates
        return Failure("env", "raised", f"episode step raised {e!r}")


def play_turn(state: RolloutState, sample: TurnSample, ctx: TurnContext, last: bool) -> None:
    """Append one sampled turn to ``state``, step its episode, and append the env's answer if it goes on."""
    ids = sample.token_ids.tolist()
    logp = sample.sample_logp.tolist()
    room = state.budget - len(state.token_ids)
    over = len(ids) > room
    ids, logp = ids[:room], logp[:room]
    text = cut_at_stop_string(ctx.tokenizer.decode(ids, skip_special_tokens=True), ctx.stop_strings)
    state.turns.append(text)
    state.token_ids += ids
    state.loss_mask += [1] * len(ids)
    state.sample_logp += logp
    state.last_turn_finished = sample.finished and not over
    step = guarded_step(state.episode, text, ctx.env_timeout_s)
    state.messages.append({"role": "assistant", "content": text})
    if isinstance(step, Failure):
        state.failures.append(step)
        state.stop_reason = "env_failed"
        return
    if over:
        state.stop_reason = "max_tokens"
    elif step.done:
        state.stop_reason = "done"
    elif last:
        state.stop_reason = "max_turns"
    if state.stop_reason:
        return
    closed = bool(ids) and ids[-1] in ctx.eos_ids
    observation = step.observation or ""
    role, tools = state.task.observation_role, state.task.tools
    env_ids = env_answer_ids(ctx.tokenizer, state.messages, observation, ctx.close_ids, closed, role, tools)
    if len(state.token_ids) + len(env_ids) >= state.budget:  # no room left for another model token
        state.stop_reason = "max_tokens"
        return
    state.token_ids += env_ids
    state.loss_mask += [0] * len(env_ids)
    state.sample_logp += [0.0] * len(env_ids)
    state.messages.append({"role": role, "content": observation})


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
    max_turns: int | None = None,
    max_rollout_tokens: int | None = None,
    env_timeout_s: float | None = ENV_TIMEOUT_S,
) -> list[Group]:
    """Sample ``group_size`` rollouts of every task and play them through ``env`` (one or several turns).

    Args:
        model: A causal LM (transformers, optionally peft-wrapped). Put in eval mode for sampling; its mode
            is restored afterwards.
        tokenizer: Its tokenizer, with a chat template.
        env: The environment; its ``stop_strings`` end a turn early (tool protocols).
        tasks: The P tasks.
        group_size: G, rollouts per task.
        max_new_tokens: Tokens per assistant turn at most (a last turn cut there is ``truncated``).
        min_new_tokens: EOS is suppressed before this many tokens.
        temperature: Sampling temperature (> 0; 0 = greedy, for evaluation).
        top_p: Nucleus sampling threshold (1 = off).
        top_k: Top-k sampling (0 = off).
        seed: Seeds the sampling (the global RNG state is restored afterwards); ``None`` uses the global RNG.
        max_prompt_tokens: Longest prompt allowed, besides the model's context minus ``max_new_tokens``.
        max_turns: Assistant turns per rollout at most (``None``: the env's ``max_turns``).
        max_rollout_tokens: Completion tokens (model + env) per rollout at most (``None``: the model's
            context minus the prompt).
        env_timeout_s: Deadline of one episode step (the env's tools and check; SIGALRM, main thread). A step
            that raises or runs past it ends its rollout with an ``"env"`` failure (``stop_reason``
            ``"env_failed"``): the rollout leaves the update. ``None``: no deadline.

    Returns:
        One :class:`Group` per task, in order, each with G rollouts (rewards not scored yet).

    Raises:
        ValueError: For bad sampling arguments, a prompt over the length limit (the message names the task),
            (multi-turn) a chat template that does not close assistant turns with an EOS token, or tasks with
            native tools (``Task.tools``) and a chat template that does not render tools.

    """
    turns = env.max_turns if max_turns is None else max_turns
    if group_size < 1 or max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens or turns < 1:
        raise ValueError(
            f"need group_size >= 1, max_new_tokens >= 1, 0 <= min_new_tokens <= max_new_tokens and max_turns "
            f">= 1; got {group_size}, {max_new_tokens}, {min_new_tokens}, {turns}"
        )
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}"
        )
    if not tasks:
        return []
    prompts = []
    for task in tasks:
        ids = render_prompt(tokenizer, task.messages, tools=task.tools)
        check_prompt_length(task, len(ids), model, max_new_tokens, max_prompt_tokens)
        prompts.append(torch.tensor(ids, dtype=torch.long))
    stop_strings = tuple(getattr(env, "stop_strings", ()))
    params = SamplingParams(max_new_tokens, min_new_tokens, temperature, top_p, top_k, stop_strings)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    close_ids = turn_close_ids(tokenizer, eos_ids) if turns > 1 else []
    ctx = TurnContext(tokenizer, frozenset(eos_ids), close_ids, stop_strings, env_timeout_s)
    limit = context_length(model)
    states = [
        RolloutState(
            task,
            env.episode(task),
            prompt.tolist(),
            min(limit - len(prompt), max_rollout_tokens or limit),
            list(task.messages),
        )
        for task, prompt in zip(tasks, prompts, strict=True)
        for _ in range(group_size)
    ]
    device = model.get_input_embeddings().weight.device
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for turn in range(turns):
                live = [s for s in states if not s.stop_reason]
                if not live:
                    break
                if turn == 0:  # the G rollouts of a task share its prompt: prefill it once
                    samples = sample_turn(model, prompts, group_size, params, eos_ids, pad_id, tokenizer)
                else:
                    histories = [torch.tensor(s.prompt_ids + s.token_ids) for s in live]
                    samples = sample_turn(model, histories, 1, params, eos_ids, pad_id, tokenizer)
                for state, sample in zip(live, samples, strict=True):
                    play_turn(state, sample, ctx, last=turn == turns - 1)
    finally:
        model.train(was_training)
    return [
        Group(
            task=task,
            prompt_ids=prompt,
            rollouts=[s.to_rollout() for s in states[i * group_size : (i + 1) * group_size]],
        )
        for i, (task, prompt) in enumerate(zip(tasks, prompts, strict=True))
    ]
