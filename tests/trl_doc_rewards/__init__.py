"""Reward functions copied unchanged from TRL's documentation, one module per example (they share a name).

Source: huggingface/trl ``docs/source/grpo_trainer.md``, section "Using a custom reward function" (commit
f2cd57710ae345ea6428ae95363267fcf38a3dc8, Apache-2.0). Each module holds one example's code block as
published; tests/test_reward_contract.py uses them by import path in recipes (``trl_doc_rewards.example3:
reward_func``) and checks their scores.
"""
