"""Optional warm start: a short SFT stage on the env's oracle (or teacher) demonstrations.

For models too weak to ever earn a reward (the answer format alone can be out of reach), a few steps of
cross-entropy on the oracle's answers give RL a non-zero signal to start from (for multi-turn envs, on the
oracle's whole episode, the env's answers masked out). ``warmstart.demos: teacher`` takes the teacher's
episodes instead: in real life no oracle exists, only the logs of the imperfect workflow the model replaces
(its errors included); ``warmstart.verified_only`` keeps only the episodes the env verifies correct (the
logs filtered by an audit). ``warmstart.equal_time_as`` makes the warm start the whole run, for as long as
another run trained (warm start + RL): the "why not SFT alone?" row of a report. The loss is the engine's own:
token-mean negative log-likelihood of the assistant tokens, computed by the same shared-prompt forward as
RL (:func:`rltk.forward.completion_logprobs`, on a :class:`~rltk.batch.Batch` of groups of one), so LoRA,
devices and ranks are handled exactly as in RL. Demonstrations come from the train split only, with a seed
distinct from the RL task pool.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase, get_scheduler

from rltk import forward
from rltk.batch import Group, Rollout, collate
from rltk.chat import env_answer_ids, render_prompt, turn_close_ids
from rltk.config import TRAIN_TIME_FILE, ConfigError
from rltk.env import Env, Message, Policy, Task, solves
from rltk.typedyaml import problem

if TYPE_CHECKING:
    from rltk.trainer import Trainer

log = logging.getLogger("rltk")

WARMSTART_SEED_OFFSET = 7919  # demonstrations use train tasks of another seed than the RL pool
# Distinct demonstration tasks drawn at most: a longer warm start (an SFT-only run of another run's wall time
# asks for up to warmstart.steps x batch_size) repeats them in epochs. Generators with a finite prompt space
# cannot draw tens of thousands of distinct tasks (doc_search_qa stops well short of 40,000).
MAX_DEMO_TASKS = 4096


def demonstration_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    answer: str,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, assistant answer through its end-of-turn token) under the chat template.

    ``tools``: the task's tool schemas (``Task.tools``), rendered with the conversation.
    """
    prompt = render_prompt(tokenizer, messages, tools=tools)
    full = render_prompt(
        tokenizer,
        [*messages, {"role": "assistant", "content": answer}],
        add_generation_prompt=False,
        tools=tools,
    )
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + answer")
    completion = full[len(prompt) :]
    eos = tokenizer.eos_token_id
    if eos in completion:  # keep the end-of-turn token (the model must learn to stop), drop what follows
        completion = completion[: completion.index(eos) + 1]
    return prompt, completion


def demonstration_group(
    tokenizer: PreTrainedTokenizerBase, env: Env, task: Task, policy: Policy | None = None
) -> Group:
    """A demonstrator's whole episode as a group of one rollout (all its turns trained on, advantage 0).

    ``policy`` is the demonstrator: the env's oracle by default, or its teacher.

    A single-turn env gives the oracle's answer through its end-of-turn token. A multi-turn env gives every
    oracle turn, with the env's answers between them laid out exactly as a multi-turn rollout lays them out
    (``loss_mask`` 0: the template's rest of the turn close, then the observation as a user turn, or a tool
    turn with native tools, and the generation prompt), so the warm start teaches the whole workflow, not only
    its first call.

    Raises:
        ValueError: If the demonstrator does not finish the episode within ``env.max_turns`` turns.

    """
    policy = env.oracle if policy is None else policy
    messages = list(task.messages)
    episode = env.episode(task)
    ids: list[int] = []
    mask: list[int] = []
    turns: list[str] = []
    close = turn_close_ids(tokenizer, [tokenizer.eos_token_id]) if env.max_turns > 1 else []
    for _ in range(env.max_turns):
        action = policy(messages)
        _, answer = demonstration_ids(tokenizer, messages, action, task.tools)
        ids += answer
        mask += [1] * len(answer)
        turns.append(action)
        step = episode.step(action)
        messages.append({"role": "assistant", "content": action})
        if step.done:
            break
        observation = step.observation or ""
        closed = answer[-1:] == close[:1]
        role = task.observation_role
        env_ids = env_answer_ids(tokenizer, messages, observation, close, closed, role, task.tools)
        ids += env_ids
        mask += [0] * len(env_ids)
        messages.append({"role": role, "content": observation})
    else:
        raise ValueError(
            f"the demonstrator of env '{env.name}' did not finish task {task.id!r} within "
            f"max_turns={env.max_turns}"
        )
    prompt = render_prompt(tokenizer, task.messages, tools=task.tools)
    rollout = Rollout(task, turns, torch.tensor(ids), torch.tensor(mask), torch.zeros(len(ids)))
    return Group(task, torch.tensor(prompt), [rollout])


def demonstrator(env: Env, demos: str) -> Policy:
    """The policy whose episodes the warm start trains on: ``"oracle"`` or ``"teacher"``.

    Raises:
        ConfigError: For ``"teacher"`` when the env ships no teacher.

    """
    if demos == "oracle":
        return env.oracle
    teacher = env.teacher()
    if teacher is None:
        why = f"env '{env.name}' ships no teacher (Env.teacher returns None)"
        raise ConfigError([problem("warmstart.demos", demos, why, "use warmstart.demos=oracle")])
    return teacher


def verified(env: Env, tasks: list[Task], policy: Policy, demos: str) -> list[Task]:
    """The tasks whose demonstration episode the env verifies correct (``warmstart.verified_only``).

    A real workflow's logs filtered by an audit: the SFT row that sees the outcome check RL trains on.

    Raises:
        ConfigError: When the env verifies none of them.

    """
    kept = [t for t in tasks if solves(env, t, policy)]
    log.info(
        "warm start: the env verifies %d of %d %s demonstrations; training on those",
        len(kept),
        len(tasks),
        demos,
    )
    if not kept:
        why = f"env '{env.name}' verifies none of {len(tasks)} {demos} demonstrations"
        raise ConfigError(
            [problem("warmstart.verified_only", True, why, "set warmstart.verified_only=false")]
        )
    return kept


def warm_start(trainer: Trainer, max_seconds: float | None = None) -> dict[str, float]:
    """Run ``cfg.warmstart.steps`` SFT steps on demonstrations; returns the last metrics.

    Each step takes the next ``batch_size`` tasks of one pool of train tasks (at most :data:`MAX_DEMO_TASKS`),
    rank after rank, in epochs once the pool is spent.

    Args:
        trainer: The RL trainer whose model, env and accelerator are used.
        max_seconds: Stop early once this much wall time has passed (SFT-only runs of equal wall time).
            The decision is all-reduced, so every rank stops at the same step.

    """
    cfg, acc = trainer.cfg, trainer.accelerator
    ws = cfg.warmstart
    policy = demonstrator(trainer.env, ws.demos)
    n = ws.steps * ws.batch_size * trainer.world
    n = min(n, max(MAX_DEMO_TASKS, ws.batch_size * trainer.world))
    tasks = trainer.env.tasks("train", n, seed=cfg.run.seed + WARMSTART_SEED_OFFSET)
    if ws.verified_only:
        tasks = verified(trainer.env, tasks, policy, ws.demos)
    params = [p for p in trainer.policy.net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ws.lr, weight_decay=0.0)
    scheduler = get_scheduler(ws.schedule, opt, num_warmup_steps=0, num_training_steps=max(1, ws.steps))
    trainer.policy.net.train()
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(ws.steps):
        start = (step * trainer.world + trainer.rank) * ws.batch_size
        chunk = [tasks[(start + i) % len(tasks)] for i in range(ws.batch_size)]  # epochs past the pool
        groups = [demonstration_group(trainer.tokenizer, trainer.env, t, policy) for t in chunk]
        batch = collate(groups, trainer.tokenizer.pad_token_id).to(acc.device)
        logp = forward.completion_logprobs(
            trainer.policy.net, batch, mode=trainer.algo.shared_prompt
        )  # [B, Lc]
        loss = -(logp * batch.loss_mask).sum() / batch.loss_mask.sum()
        if trainer.policy.critic is not None:  # DDP reduces a gradient for every trainable weight: a zero one
            loss = loss + 0.0 * sum(p.sum() for p in trainer.policy.critic.parameters() if p.requires_grad)
        acc.backward(loss)
        acc.clip_grad_norm_(trainer.policy.net.parameters(), cfg.optim.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        metrics = {"warmstart/loss": float(loss.detach()), "warmstart/step": step + 1, "warmstart/lr": lr}
        if (step + 1) % max(1, ws.steps // 10) == 0 or step + 1 == ws.steps:
            log.info("warm start step %d/%d  loss %.4f", step + 1, ws.steps, metrics["warmstart/loss"])
        spent = max_seconds is not None and time.perf_counter() - t0 > max_seconds
        if max_seconds is not None and trainer.all_reduce_sum(float(spent)):
            log.info("warm start stopped at step %d: %.0f s time budget spent", step + 1, max_seconds)
            break
    trainer.policy.net.eval()
    metrics["warmstart/time_s"] = time.perf_counter() - t0
    trainer.metrics.log(0, metrics)
    return metrics


def record_train_time(run_dir: str | Path, warmstart_s: float, rl_s: float, rl_steps: int) -> None:
    """Write the run's training wall time (``train_time.json``: warm start + RL steps, evals excluded).

    The seconds are the run's own (a resumed run's trainer restores them from its checkpoint, so the steps a
    kill lost and redid count once).
    """
    record = {"warmstart_s": warmstart_s, "rl_s": rl_s, "rl_steps": rl_steps, "total_s": warmstart_s + rl_s}
    (Path(run_dir) / TRAIN_TIME_FILE).write_text(json.dumps(record, indent=2) + "\n")


def equal_time_budget(run_dir: str | Path) -> float:
    """The training wall time another run recorded: what an SFT-only comparison run may spend."""
    return float(json.loads((Path(run_dir) / TRAIN_TIME_FILE).read_text())["total_s"])
