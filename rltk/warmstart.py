"""Optional warm start: a short SFT stage on the env's oracle demonstrations.

For models too weak to ever earn a reward (the answer format alone can be out of reach), a few steps of
cross-entropy on the oracle's answers give RL a non-zero signal to start from. The loss is the engine's own
(token-mean CE over the assistant tokens, prompt masked), on the same model object, so LoRA adapters,
devices and ranks are handled exactly as in RL. The demonstrations come from the train split only, with a
seed distinct from the RL task pool.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from rltk.rollout import render_prompt

if TYPE_CHECKING:
    from rltk.trainer import Trainer

log = logging.getLogger("rltk")

WARMSTART_SEED_OFFSET = 7919  # demonstrations use train tasks of another seed than the RL pool


def demonstration_ids(tokenizer, messages: list[dict[str, str]], answer: str) -> tuple[list[int], list[int]]:
    """Token ids of (prompt, assistant answer through its end-of-turn token) under the chat template."""
    prompt = render_prompt(tokenizer, messages)
    full = render_prompt(tokenizer, [*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template does not render the prompt as a prefix of prompt + answer")
    completion = full[len(prompt) :]
    eos = tokenizer.eos_token_id
    if eos in completion:  # keep the end-of-turn token (the model must learn to stop), drop what follows
        completion = completion[: completion.index(eos) + 1]
    return prompt, completion


def warm_start(trainer: Trainer) -> dict[str, float]:
    """Run ``cfg.warmstart.steps`` SFT steps on oracle demonstrations; returns the last metrics."""
    cfg, acc = trainer.cfg, trainer.accelerator
    ws = cfg.warmstart
    n = ws.steps * ws.batch_size * trainer.world
    tasks = trainer.env.tasks("train", n, seed=cfg.run.seed + WARMSTART_SEED_OFFSET)
    examples = [
        demonstration_ids(trainer.tokenizer, t.messages, trainer.env.oracle(t.messages)) for t in tasks
    ]
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ws.lr, weight_decay=0.0)
    pad = trainer.tokenizer.pad_token_id
    trainer.model.train()
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(ws.steps):
        start = (step * trainer.world + trainer.rank) * ws.batch_size
        chunk = examples[start : start + ws.batch_size]
        length = max(len(p) + len(c) for p, c in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)  # [B, L] right-padded
        labels = torch.full((len(chunk), length), -100, dtype=torch.long)  # [B, L]
        attn = torch.zeros((len(chunk), length), dtype=torch.long)  # [B, L]
        for i, (p, c) in enumerate(chunk):
            row = p + c
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, len(p) : len(row)] = torch.tensor(c)
            attn[i, : len(row)] = 1
        ids, labels, attn = (t.to(acc.device) for t in (ids, labels, attn))
        logits = trainer.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # [B, L-1, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        acc.backward(loss)
        acc.clip_grad_norm_(trainer.model.parameters(), cfg.optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics = {"warmstart/loss": float(loss.detach()), "warmstart/step": step + 1}
        if (step + 1) % max(1, ws.steps // 10) == 0 or step + 1 == ws.steps:
            log.info("warm start step %d/%d  loss %.4f", step + 1, ws.steps, metrics["warmstart/loss"])
    trainer.model.eval()
    metrics["warmstart/time_s"] = time.perf_counter() - t0
    trainer.metrics.log(0, metrics)
    return metrics
