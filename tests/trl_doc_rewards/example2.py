# Copied unchanged from TRL's docs (grpo_trainer.md, "Example 2: Reward completions with a specific format"),
# Apache-2.0. Written for the conversational format: a recipe uses it with `format: messages`.
# ruff: noqa
# fmt: off
import re

def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]
