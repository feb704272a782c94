"""rltk's shipped environments, installed as ``rltk_envs`` (entry points ``rltk.envs``)."""
