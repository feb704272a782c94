"""rltk's shipped reward functions, installed as ``rltk_rewards`` (entry points ``rltk.rewards``)."""
