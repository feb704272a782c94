# Copied unchanged from TRL's docs (grpo_trainer.md, "Example 1.1: Reward longer completions (based on the
# number of characters)"), Apache-2.0.
# ruff: noqa
# fmt: off
def reward_func(completions, **kwargs):
    """Reward function that assigns higher scores to longer completions (in terms of character count)."""
    return [float(len(completion)) for completion in completions]
