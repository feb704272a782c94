# Copied unchanged from TRL's docs (grpo_trainer.md, "Example 1: Reward longer completions"), Apache-2.0.
# ruff: noqa
# fmt: off
def reward_func(completion_ids, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of token count)."""
    return [float(len(ids)) for ids in completion_ids]
