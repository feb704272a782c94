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


class ReferenceRead(AssertionError):
    """Raised when a teacher reads the task's reference or calls the oracle."""


class GuardedReference(dict):
    """A task reference that raises on any read while a guarded teacher runs (the env reads it freely)."""

    def _guard(self) -> None:
        if _TEACHER_RUNNING:
            raise ReferenceRead("the teacher read Task.reference")

    def __getitem__(self, key: object) -> object:
        self._guard()
        return super().__getitem__(key)

    def get(self, key: object, default: object = None) -> object:
        self._guard()
        return super().get(key, default)

    def __iter__(self):
        self._guard()
        return super().__iter__()

    def items(self):
        self._guard()
        return super().items()

    def values(self):
        self._guard()
        return super().values()

    def keys(self):
        self._guard()
        return super().keys()

    def __contains__(self, key: object) -> bool:
        self._guard()
        return super().__contains__(key)


_TEACHER_RUNNING: list[bool] = []  # non-empty while a guarded teacher call runs


def guarded_teacher(env: Env) -> Callable[[list], str]:
    """``env.teacher()`` wrapped so that reading a reference or calling the oracle during a call raises."""
    teacher = env.teacher()
    assert teacher is not None, f"env {env.name} ships no teacher"

    def forbidden_oracle(*_: object, **__: object) -> str:
        raise ReferenceRead("the teacher called the oracle")

    def call(messages: list) -> str:
        real_oracle = env.oracle
        env.oracle = forbidden_oracle  # type: ignore[method-assign]
        _TEACHER_RUNNING.append(True)
        try:
            return teacher(messages)
        finally:
            _TEACHER_RUNNING.pop()
            env.oracle = real_oracle  # type: ignore[method-assign]

    return call


def guard_references(tasks: list) -> list:
    """``tasks`` with each reference a :class:`GuardedReference` (equal content)."""
    from dataclasses import replace

    return [replace(t, reference=GuardedReference(t.reference)) for t in tasks]


def teacher_answers(make_env: Callable[[], Env], split: str = "eval", n: int = 200) -> list[list[str]]:
    """The teacher's turns per task, each call guarded (no reference, no oracle)."""
    from rltk.env import run_policy

    env = make_env()
    teacher = guarded_teacher(env)
    return [run_policy(env, t, teacher).actions for t in guard_references(env.tasks(split, n))]


def assert_teacher_contract(
    make_env: Callable[[], Env],
    env_import: str,
    n: int = 200,
    valid_format: Callable[[dict], bool] | None = None,
) -> dict[str, float]:
    """The teacher contract on ``n`` eval tasks; returns the accuracies it measured.

    - It never reads a task's reference or calls the oracle (guarded), and is deterministic across processes
      (``env_import``: a Python expression that builds the same env in a fresh interpreter, e.g.
      ``"rltk.plugins.make_env('policy_flagging', {})"``, run with another hash seed).
    - Its accuracy is at least the best trivial policy's + 15 points and at most the oracle's - 10.
    - At least 90% of its errors fall in the slices its ``weak_slices`` names.
    - ``valid_format(outcome)`` holds for every one of its outcomes (its format is always valid).
    """
    import json
    import os
    import subprocess
    import sys

    from rltk.env import run_policy

    env = make_env()
    teacher = env.teacher()
    assert teacher is not None
    tasks = env.tasks("eval", n)
    guarded = guard_references(tasks)
    call = guarded_teacher(env)
    episodes = [run_policy(env, t, call) for t in guarded]
    actions = [e.actions for e in episodes]
    code = (
        "import json, rltk.plugins\n"
        f"from rltk.env import run_policy\nenv = {env_import}\nt = env.teacher()\n"
        f"print(json.dumps([run_policy(env, x, t).actions for x in env.tasks('eval', {n})]))"
    )
    envvars = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=envvars, check=True
    )
    assert json.loads(out.stdout) == actions, "the teacher is not deterministic across processes"

    def accuracy(policy: Callable[[list], str]) -> float:
        return sum(bool(run_policy(env, t, policy).outcome.get("correct")) for t in tasks) / len(tasks)

    correct = [bool(e.outcome.get("correct")) for e in episodes]
    acc = sum(correct) / n
    oracle = accuracy(env.oracle)
    trivial = max((accuracy(p) for p in env.baselines().values()), default=0.0)
    assert trivial + 0.15 <= acc <= oracle - 0.10, (trivial, acc, oracle)
    errors = [t for t, ok in zip(tasks, correct, strict=True) if not ok]
    in_slices = sum(teacher.in_weak_slice(t) for t in errors)
    assert in_slices >= 0.9 * len(errors), f"{in_slices} of {len(errors)} errors in the named slices"
    if valid_format is not None:
        bad = [e.outcome for e in episodes if not valid_format(e.outcome)]
        assert not bad, f"{len(bad)} teacher outcomes in an invalid format, e.g. {bad[0]}"
    share = in_slices / max(1, len(errors))
    return {"teacher": acc, "oracle": oracle, "best_trivial": trivial, "errors_in_slices": share}
