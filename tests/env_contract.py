"""Checks every env's tests share: splits disjoint by construction, tasks deterministic and prefix-stable."""

from __future__ import annotations

from collections.abc import Callable

from rltk.env import Env, prompt_hash, split_of


def assert_splits_disjoint(env: Env, sizes: tuple[int, int, int] = (2000, 200, 200)) -> None:
    """Every task lies in the split its prompt hash assigns; no prompt repeats within or across splits."""
    tasks = {s: env.tasks(s, n) for s, n in zip(("train", "eval", "test"), sizes, strict=True)}
    for s, ts in tasks.items():
        assert all(split_of(t.messages) == s == t.split for t in ts)
    hashes = {s: {prompt_hash(t.messages) for t in ts} for s, ts in tasks.items()}
    assert [len(h) for h in hashes.values()] == list(sizes)  # no duplicates within a split either
    assert not hashes["train"] & hashes["eval"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["eval"] & hashes["test"]


def assert_deterministic(make_env: Callable[[], Env], other_seed_overlap: int = 0) -> None:
    """The same (split, n, seed) gives the same tasks from a fresh env, shorter lists are prefixes, and
    another seed gives other prompts (at most ``other_seed_overlap`` of 30 in common)."""
    env = make_env()
    a = env.tasks("eval", 30, seed=3)
    assert a == make_env().tasks("eval", 30, seed=3)
    assert env.tasks("eval", 10, seed=3) == a[:10]  # prefix-stable
    other = {prompt_hash(t.messages) for t in env.tasks("eval", 30, seed=4)}
    assert len(other & {prompt_hash(t.messages) for t in a}) <= other_seed_overlap
    assert len({t.id for t in a}) == 30
