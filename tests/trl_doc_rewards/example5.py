# Copied unchanged from TRL's docs (grpo_trainer.md, "Example 5: Asynchronous reward functions"), Apache-2.0.
# ruff: noqa
# fmt: off
import asyncio

async def async_reward_func(prompts, completions, **kwargs):
    # Simulate an I/O-bound call (e.g., HTTP request, database lookup)
    await asyncio.sleep(0.01)
    # Simple toy reward: 1.0 if the completion is non-empty, else 0.0
    return [1.0 if completion else 0.0 for completion in completions]
