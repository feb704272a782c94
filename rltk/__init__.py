"""rltk: vertical RL fine-tuning of small open models (env → rollout → reward → advantage → update)."""
