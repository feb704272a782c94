# Copied unchanged from TRL's docs (grpo_trainer.md, "Example 3: Reward completions based on a reference"),
# Apache-2.0. Standard (text) format; reads the dataset column `ground_truth` (rltk: a reference field).
# ruff: noqa
# fmt: off
import re

def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]
