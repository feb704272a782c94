"""``rltk envs check NAME``: the contract every shipped env passes, run on any env, with each miss's fix.

Each check (:data:`CHECKS`) is a small function of a :class:`Subject` (the env, its tasks and the oracle's
episodes, computed once) returning ``(status, detail, fix)``; one that raises fails with what it raised.
They cover: a description; ``default_rewards`` a dict of registered rewards; ``tasks(split, n, seed=0)``
gives n Tasks of the split; splits disjoint by prompt hash; determinism (a fresh env, a fresh process with
another hash seed, prefixes, another seed); the oracle correct on every eval task, each of its turns within
``env.max_new_tokens`` tokens; the verdict's keys (a bool ``correct``; a well-formed wrong answer, another
task's oracle answer, judged incorrect); ``answer`` for ``algorithm.balance_answers`` (a warning); the
default rewards on the oracle's episodes; baselines and teacher run (a warning without a teacher, with one
outside [best trivial + 15, oracle - 10] points, or with under 90% of its errors in its ``weak_slices``:
:mod:`rltk.envcheck_policies`); and no canary of :mod:`rltk.canaries` (empty, echo, padding, hedge,
...) judged correct or scoring above the well-formed wrong answer with the default rewards, task by task.

Multi-turn envs: the oracle plays the episode up to its final turn and the canary replaces that final turn
only, cut at the env's stop strings as the rollout engine cuts a model's turn (a canary cut back to the
oracle's own answer is skipped). Status ``pass``, ``warn`` (works, but something a setting or a report
needs is missing) or ``fail``; any ``fail`` makes ``rltk envs check`` exit 2. The env is built once, up
front, through :func:`rltk.plugins.make_env`: an unknown name or a rejected option is an error, not a row.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch

from rltk import plugins
from rltk.batch import Group, Rollout
from rltk.canaries import WRONG, canaries
from rltk.contract import EnvContractError, Outcome, class_problems, description_of, env_name
from rltk.env import SPLITS, Env, Episode, Message, Policy, Task, prompt_hash, run_policy, split_of
from rltk.envcheck_policies import check_answer_length, check_baselines, check_teacher
from rltk.reward import Rubric
from rltk.rollout import cut_at_stop_string

Status = Literal["pass", "warn", "fail"]
Verdict = tuple[Status, str, str]  # status, detail, fix
_EMPTY = torch.zeros(0, dtype=torch.long)
_TOL = 1e-6


@dataclass
class CheckResult:
    """One row of the report: the check's name, ``pass``/``warn``/``fail``, what it found, the fix."""

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class Subject:
    """The env under check and what several checks share, computed once on first use."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    n: int = 200

    @cached_property
    def cls(self) -> type[Env]:
        """The env class (the lookup's errors are the check's)."""
        return plugins.get_env(self.name)

    @cached_property
    def env(self) -> Env:
        """The env built with the options (:func:`run_checks` sets it through make_env when it can)."""
        return self.cls(**self.options)

    @cached_property
    def tasks(self) -> dict[str, list[Task]]:
        """``n`` tasks of each split, seed 0."""
        return {s: self.env.tasks(s, self.n, seed=0) for s in SPLITS}

    @cached_property
    def oracle_episodes(self) -> list[Episode]:
        """The oracle's episode of every eval task."""
        return [run_policy(self.env, t, self.env.oracle) for t in self.tasks["eval"]]

    @cached_property
    def oracle_by_id(self) -> dict[str, Episode]:
        """The oracle's eval episodes by task id."""
        return {e.task.id: e for e in self.oracle_episodes}

    @cached_property
    def rubric(self) -> Rubric:
        """The env's default rewards, run in this process (cheap pure functions; SIGALRM deadline)."""
        return Rubric.from_config([], self.env, workers=0)

    def scored(self, episodes: list[tuple[Task, list[str], Any]]) -> list[Rollout]:
        """``(task, turns, outcome)`` as rollouts scored by the default rewards (as ``rltk eval`` scores)."""
        rollouts = [
            Rollout(t, turns, _EMPTY, _EMPTY, _EMPTY.float(), Outcome.of(env_name(self.env), o))
            for t, turns, o in episodes
        ]
        self.rubric.score([Group(r.task, _EMPTY, [r]) for r in rollouts])
        return rollouts

    @cached_property
    def baseline_accuracy(self) -> dict[str, float]:
        """Each trivial policy's accuracy on the eval tasks."""
        return {name: self.accuracy(policy)[0] for name, policy in self.env.baselines().items()}

    def accuracy(self, policy: Policy) -> tuple[float, list[Rollout]]:
        """A policy's accuracy on the eval tasks, and its scored rollouts."""
        episodes = [run_policy(self.env, t, policy) for t in self.tasks["eval"]]
        rollouts = self.scored([(e.task, e.actions, e.outcome) for e in episodes])
        return sum(r.outcome["correct"] for r in rollouts) / max(1, len(rollouts)), rollouts


def check_description(s: Subject) -> Verdict:
    """A one-line ``description`` class attribute."""
    own = getattr(s.cls, "description", None)
    fix = 'set the class attribute description = "One line: what the model learns."'
    if isinstance(own, str) and own.strip():
        return "pass", own.strip().splitlines()[0], ""
    fallback = description_of(s.cls)
    if fallback:
        return "warn", f"no description; rltk envs list shows the docstring's first line: {fallback!r}", fix
    return "fail", "no description and no docstring: rltk envs list shows nothing", fix


def check_default_rewards(s: Subject) -> Verdict:
    """``default_rewards``: a dict of registered reward names to weights (and the class's other attrs)."""
    problems = class_problems(s.cls)
    if problems:
        return "fail", "; ".join(w for w, _ in problems), "; ".join(f for _, f in problems)
    rewards = dict(s.cls.default_rewards)
    if not rewards:
        return "warn", "no default_rewards: every recipe must list rewards", "default_rewards = {'name': 1.0}"
    for reward in rewards:
        plugins.get_reward(reward)  # a PluginError names the closest registered reward
    return "pass", ", ".join(f"{k}: {v}" for k, v in rewards.items()), ""


def check_tasks(s: Subject) -> Verdict:
    """``tasks(split, n, seed=0)`` returns ``n`` Task objects of the split with unique ids."""
    fix = "return exactly n rltk.env.Task objects of the split asked for, each with its own id"
    for split, tasks in s.tasks.items():
        if not isinstance(tasks, list) or len(tasks) != s.n or not all(isinstance(t, Task) for t in tasks):
            got = f"{type(tasks).__name__} of {len(tasks) if hasattr(tasks, '__len__') else '?'}"
            return "fail", f"tasks({split!r}, {s.n}) returned a {got}, not a list of {s.n} Task", fix
        wrong = [t.id for t in tasks if t.split != split]
        if wrong:
            return "fail", f"tasks({split!r}, ...) gave tasks of split {tasks[0].split!r}: {wrong[:3]}", fix
        ids = Counter(t.id for t in tasks)
        if len(ids) < len(tasks):
            return "fail", f"repeated ids in {split}: {[i for i, c in ids.items() if c > 1][:3]}", fix
    return "pass", f"{s.n} tasks of each split", ""


def check_splits(s: Subject) -> Verdict:
    """Every task's prompt hashes into its split (``rltk.env.split_of``); no prompt appears twice.

    An env with ``splits_by_prompt_hash = False`` keeps its splits apart by its own rule: only the second
    half applies.
    """
    fix = "draw tasks with rltk.env.draw_task: it keeps a candidate only if split_of(its prompt) is the split"
    for split, tasks in s.tasks.items() if s.cls.splits_by_prompt_hash else ():
        off = [t.id for t in tasks if split_of(t.messages) != split]
        if off:
            return "fail", f"{len(off)} {split} tasks hash into another split, e.g. {off[0]}", fix
    seen: dict[str, str] = {}
    for split, tasks in s.tasks.items():
        for t in tasks:
            h = prompt_hash(t.messages)
            if h in seen:
                return "fail", f"the prompt of {t.id} ({split}) repeats {seen[h]}", fix
            seen[h] = f"{t.id} ({split})"
    return "pass", f"{len(seen)} prompts, disjoint by hash", ""


def check_determinism(s: Subject) -> Verdict:
    """Same tasks from a fresh env and a fresh process, prefix-stable, other prompts for another seed."""
    fix = "derive every random draw from (seed, split, index), e.g. random.Random(f'{seed}:{split}:{i}')"
    tasks = s.tasks["eval"]
    if s.cls(**s.options).tasks("eval", s.n, seed=0) != tasks:
        return "fail", "a fresh env gave other eval tasks for the same (split, n, seed)", fix
    half = max(1, s.n // 2)
    if s.env.tasks("eval", half, seed=0) != tasks[:half]:
        return "fail", f"tasks('eval', {half}) is not a prefix of tasks('eval', {s.n})", fix + " and index"
    other = {prompt_hash(t.messages) for t in s.env.tasks("eval", s.n, seed=1)}
    if other == {prompt_hash(t.messages) for t in tasks}:
        return "fail", "seed=1 gives the same prompts as seed=0", "use the seed in every draw"
    return _fresh_process(s, [prompt_hash(t.messages) for t in tasks], fix)


def _fresh_process(s: Subject, hashes: list[str], fix: str) -> Verdict:
    """Rebuild the eval prompts in a new interpreter with another hash seed (set/str-hash order leaks)."""
    if (
        s.name in plugins._REGISTRY["env"]
        and ":" not in s.name
        and s.name not in plugins._entry_points("env")
    ):
        return "pass", "same tasks from a fresh env (registered in-process: no fresh-process check)", ""
    code = (
        "import json, sys\nfrom rltk.plugins import make_env\nfrom rltk.env import prompt_hash\n"
        "name, options, n = json.loads(sys.argv[1])\n"
        "print(json.dumps([prompt_hash(t.messages) for t in make_env(name, options).tasks('eval', n)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    arg = json.dumps([s.name, s.options, s.n])
    out = subprocess.run(
        [sys.executable, "-c", code, arg], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return "fail", f"a fresh process could not build the tasks: {tail[0]}", "see the error above"
    if json.loads(out.stdout.strip().splitlines()[-1]) != hashes:
        why = "a fresh process (another PYTHONHASHSEED) gave other eval tasks"
        return "fail", why, fix + "; iterate sorted(...) instead of sets"
    return "pass", "same tasks from a fresh env and a fresh process; prefix-stable; seeds differ", ""


def check_oracle(s: Subject) -> Verdict:
    """The oracle solves every eval task."""
    episodes = s.oracle_episodes
    wrong = [e for e in episodes if not e.outcome["correct"]]
    detail = f"{len(episodes) - len(wrong)}/{len(episodes)} eval tasks correct"
    if wrong:
        e = wrong[0]
        example = f"; e.g. {e.task.id}: answered {(e.actions or [''])[-1][:60]!r}, verdict {dict(e.outcome)}"
        fix = "the oracle must solve every task from the conversation alone, and check must judge it correct"
        return "fail", detail + example, fix
    return "pass", detail, ""


def check_verdict(s: Subject) -> Verdict:
    """The verdict carries a bool ``correct``, and a well-formed wrong answer is judged incorrect."""
    keys = sorted({k for e in s.oracle_episodes for k in e.outcome})
    judged = [_play_final(s, t, _other_final(s, i)) for i, t in enumerate(s.tasks["eval"])]
    if s.oracle_episodes and all(e.outcome["correct"] for e in judged):
        why = "every eval task's verdict on another task's oracle answer is correct: check accepts anything"
        return "fail", why, "compare the answer with the task's reference in check"
    return "pass", f"keys: {', '.join(keys)}", ""


def check_answer(s: Subject) -> Verdict:
    """Verdicts carry ``answer`` (the class ``algorithm.balance_answers`` balances)."""
    if any("answer" in e.outcome for e in s.oracle_episodes):
        classes = Counter(str(e.outcome.get("answer")) for e in s.oracle_episodes)
        return "pass", f"{len(classes)} answer classes in the oracle's verdicts", ""
    why = "verdicts carry no 'answer': algorithm.balance_answers would do nothing"
    return "warn", why, "return Outcome(answer=<parsed answer class>) (or 'answer' in the dict) from check"


def check_rewards(s: Subject) -> Verdict:
    """The default rewards score every oracle episode without failing."""
    rollouts = s.scored([(e.task, e.actions, e.outcome) for e in s.oracle_episodes])
    failed = [r for r in rollouts if r.failed]
    if failed:
        why = f"rewards failed on {len(failed)} oracle episodes, e.g. {failed[0].failures[0]}"
        return "fail", why, "a reward must return a number in its range (or None) for every answer"
    mean = sum(r.reward for r in rollouts) / max(1, len(rollouts))
    return "pass", f"{', '.join(it.name for it in s.rubric.items)}: oracle mean reward {mean:+.3f}", ""


def check_canaries(s: Subject) -> Verdict:
    """No canary is judged correct or out-scores a well-formed wrong answer (per task, default rewards)."""
    plays: list[tuple[Task, list[str], Any]] = []
    names: list[str] = []
    same: Counter[str] = Counter()  # canaries that the stop strings cut back to the oracle's answer
    for i, task in enumerate(s.tasks["eval"]):
        wrong = next(
            (w for w in _wrong_candidates(s, i) if not _play_final(s, task, w).outcome["correct"]), None
        )
        if wrong is None:
            continue  # every other answer is right here too: no wrong answer to compare with
        oracle = (s.oracle_episodes[i].actions or [""])[-1]
        for name, text in canaries(s.env, task, oracle, wrong):
            if name != WRONG and _delivered(s, text) == _delivered(s, oracle):
                same[name] += 1  # the engine hands the env exactly the oracle's answer: not a canary
                continue
            e = _play_final(s, task, text)
            plays.append((task, e.actions, e.outcome))
            names.append(name)
    if not plays:
        return "warn", "no task has a wrong answer among other tasks' oracle answers", ""
    rollouts = s.scored(plays)
    floor: dict[str, Rollout] = {r.task.id: r for r, n in zip(rollouts, names, strict=True) if n == WRONG}
    bad: dict[str, list[str]] = {}
    for r, name in zip(rollouts, names, strict=True):
        ref = floor[r.task.id]
        if name == WRONG:
            continue
        why = (
            "judged correct"
            if r.outcome["correct"]
            else f"reward failed: {r.failures[0]}"
            if r.failed
            else f"reward {r.reward:+.3f} > wrong answer's {ref.reward:+.3f}"
            if not ref.failed and r.reward > ref.reward + _TOL
            else ""
        )
        if why:
            bad.setdefault(name, []).append(f"{r.task.id}: {why} ({r.turns[-1][:40]!r})")
    tasks = len(floor)
    if bad:
        detail = "; ".join(f"{k} on {len(v)}/{tasks} tasks, e.g. {v[0]}" for k, v in bad.items())
        fix = (
            "parse the whole answer strictly in check and the rewards: a malformed answer scores the minimum"
        )
        return "fail", detail, fix
    kinds = sorted({n for n in names if n != WRONG})
    cut = f" ({', '.join(sorted(same))}: cut at the stop strings to the oracle's answer)" if same else ""
    return "pass", f"{len(kinds)} canaries × {tasks} tasks: none above a wrong answer{cut}", ""


def _wrong_candidates(s: Subject, i: int, tries: int = 5) -> list[str]:
    """Other eval tasks' oracle final answers, the next ones first (well-formed, likely wrong for task i)."""
    return [_other_final(s, i, k) for k in range(1, min(tries, len(s.oracle_episodes) - 1) + 1)]


def _other_final(s: Subject, i: int, k: int = 1) -> str:
    eps = s.oracle_episodes
    return (eps[(i + k) % len(eps)].actions or [""])[-1]


def _delivered(s: Subject, text: str) -> str:
    """What the env sees of a model turn ``text``: the rollout engine cuts it after the first stop string."""
    return cut_at_stop_string(text, tuple(getattr(s.env, "stop_strings", ())))


def _play_final(s: Subject, task: Task, final: str) -> Episode:
    """The oracle's episode of ``task`` with its final turn replaced by ``final`` (cut as the engine cuts)."""
    turns = max(1, len(s.oracle_by_id[task.id].actions))
    text = _delivered(s, final)
    start = sum(m.get("role") == "assistant" for m in task.messages)

    def policy(messages: list[Message]) -> str:
        done = sum(m.get("role") == "assistant" for m in messages) - start
        return s.env.oracle(messages) if done < turns - 1 else text

    return run_policy(s.env, task, policy)


_CHECK_RAISES = (
    "check must never raise on model output: return Outcome(correct=False) (or a dict with correct False) "
    "for an answer it cannot parse"
)
RAISE_FIX = {"verdict": _CHECK_RAISES, "canaries": _CHECK_RAISES}
"""The fix for a check that raised, where it plays model-like answers (else: fix the env where it raised)."""

CHECKS: list[tuple[str, Callable[[Subject], Verdict]]] = [
    ("description", check_description),
    ("default_rewards", check_default_rewards),
    ("tasks", check_tasks),
    ("splits", check_splits),
    ("determinism", check_determinism),
    ("oracle", check_oracle),
    ("answer_length", check_answer_length),
    ("verdict", check_verdict),
    ("answer", check_answer),
    ("rewards", check_rewards),
    ("baselines", check_baselines),
    ("teacher", check_teacher),
    ("canaries", check_canaries),
]
"""The checks in the order they run (and print)."""


def run_checks(name: str, options: dict[str, Any] | None = None, n: int = 200) -> list[CheckResult]:
    """Run every check of :data:`CHECKS` on env ``name`` built with ``options``, on ``n`` tasks per split.

    Raises:
        rltk.plugins.PluginError: If ``name`` does not resolve or the env rejects ``options`` (nothing to
            check; the message names the valid options).

    """
    subject = Subject(name, dict(options or {}), n)
    # an unknown name or a rejected option is the caller's error (one message), not a row per check; a class
    # attribute the engine cannot use (EnvContractError) is the default_rewards row's
    with contextlib.suppress(EnvContractError):
        subject.env = plugins.make_env(name, subject.options)
    results = []
    try:
        for check_name, check in CHECKS:
            results.append(_run_one(check_name, check, subject))
    finally:
        if "rubric" in subject.__dict__:
            subject.rubric.close()
    return results


def _run_one(name: str, check: Callable[[Subject], Verdict], subject: Subject) -> CheckResult:
    """One check; what it raises is its failure (with where, for an error in the env's code)."""
    try:
        status, detail, fix = check(subject)
    except (EnvContractError, plugins.PluginError) as exc:
        return CheckResult(name, "fail", exc.why, exc.fix)
    except Exception as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        where = f"{os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}"
        fix = RAISE_FIX.get(name, "fix the env there")
        return CheckResult(name, "fail", f"raised {type(exc).__name__}: {exc} ({where})", fix)
    return CheckResult(name, status, detail, fix)


def format_results(name: str, results: list[CheckResult]) -> str:
    """The report: one row per check, then the fix of each failure and warning."""
    width = max(len(r.name) for r in results)
    lines = [f"env {name}"]
    lines += [f"  {r.status.upper():4s}  {r.name:{width}s}  {r.detail}" for r in results]
    fixes = [r for r in results if r.status != "pass" and r.fix]
    if fixes:
        lines.append("fix:")
        lines += [f"  {r.name}: {r.fix}" for r in fixes]
    failed = sum(r.status == "fail" for r in results)
    lines.append(
        f"{failed} failed, {sum(r.status == 'warn' for r in results)} warnings, {len(results)} checks"
    )
    return "\n".join(lines)
