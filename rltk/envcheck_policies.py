"""The ``rltk envs check`` rows on what the policies emit: the oracle's turn lengths, baselines and teacher.

``answer_length`` tokenizes every oracle turn of the eval tasks already played with the default model's
tokenizer (loaded once per process) and fails on a turn longer than ``env.max_new_tokens``: the model could
never emit it. ``teacher`` also checks the teacher's ``weak_slices``: at least :data:`WEAK_SHARE` of its
errors on the eval tasks must fall in the slices it names (a warning otherwise), as the shipped envs'
teachers do. Each check takes a :class:`~rltk.envcheck.Subject` and returns ``(status, detail, fix)``.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import TYPE_CHECKING

from rltk.env import Task, Teacher

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rltk.batch import Rollout
    from rltk.envcheck import Subject, Verdict

WEAK_SHARE = 0.9
"""The least share of a teacher's errors that must fall in the slices its ``weak_slices`` names."""

WEAK_FIX = (
    "declare the slices it gets wrong in weak_slices = {info key: (values, ...)}, keyed by Task.info tags"
)
LENGTH_FIX = "raise max_new_tokens, or make the answers shorter: the model can never emit this answer"


@functools.cache
def default_tokenizer() -> PreTrainedTokenizerBase:
    """The default model's tokenizer (cached locally by rltk; no download), loaded once per process."""
    from rltk.models import load_tokenizer

    return load_tokenizer()


def check_answer_length(s: Subject) -> Verdict:
    """Every oracle turn of the eval tasks fits in ``env.max_new_tokens`` tokens (the per-turn limit)."""
    from rltk.models import DEFAULT_MODEL, ModelError

    turns = [(e.task.id, text) for e in s.oracle_episodes for text in e.actions]
    if not turns:
        return "pass", "no oracle turns to measure", ""
    try:
        tokenizer = default_tokenizer()
    except ModelError as exc:
        why = f"answer lengths unchecked: {str(exc).splitlines()[0]}"
        return "warn", why, f"make the {DEFAULT_MODEL} tokenizer loadable (the error names how)"
    ids = tokenizer([text for _, text in turns], add_special_tokens=False)["input_ids"]
    lengths = [(len(tokens), task_id, text) for tokens, (task_id, text) in zip(ids, turns, strict=True)]
    limit = s.env.max_new_tokens
    longest, task_id, text = max(lengths, key=lambda x: x[0])
    over = sum(n > limit for n, _, _ in lengths)
    if over:
        why = (
            f"{over} of {len(lengths)} oracle turns exceed max_new_tokens {limit} ({DEFAULT_MODEL} tokens); "
            f"longest: {task_id}, {longest} tokens ({text[:40]!r})"
        )
        return "fail", why, LENGTH_FIX
    return "pass", f"longest oracle turn {longest} tokens ({task_id}) of max_new_tokens {limit}", ""


def check_baselines(s: Subject) -> Verdict:
    """Every trivial policy runs; none solves every task."""
    accs = s.baseline_accuracy
    if not accs:
        return (
            "warn",
            "no baselines: reports cannot show the best trivial policy",
            "return them from baselines()",
        )
    detail = ", ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items())
    solved = [k for k, v in accs.items() if v >= 1.0]
    if solved:
        return (
            "fail",
            f"{solved[0]} solves every task: {detail}",
            "make tasks that a constant answer cannot solve",
        )
    return "pass", detail, ""


def check_teacher(s: Subject) -> Verdict:
    """The teacher runs, within [best trivial + 15, oracle - 10] points, erring in its ``weak_slices``.

    Either miss is a warning: accuracy outside the band, or under :data:`WEAK_SHARE` of its errors on the
    eval tasks in the slices ``weak_slices`` names (none named counts as 0%).
    """
    teacher = s.env.teacher()
    if teacher is None:
        fix = "return an rltk.env.Teacher from teacher(): the imperfect workflow the model replaces"
        return "warn", "no teacher: no proof-report baseline, no warmstart.demos: teacher", fix
    if not isinstance(teacher, Teacher):
        return "fail", f"teacher() returned a {type(teacher).__name__}", "subclass rltk.env.Teacher"
    acc, rollouts = s.accuracy(teacher)
    trivial = max(s.baseline_accuracy.values(), default=0.0)
    oracle = sum(e.outcome["correct"] for e in s.oracle_episodes) / max(1, len(s.oracle_episodes))
    details, fixes = [f"{100 * acc:.1f}% (best trivial {100 * trivial:.1f}%)"], []
    if not trivial + 0.15 <= acc <= oracle - 0.10:
        details.append("outside [best trivial + 15, oracle - 10] points")
        fixes.append(
            "a teacher errs on named slices (weak_slices) and beats every trivial policy by 15 points"
        )
    weak, share = weak_slice_share(teacher, rollouts)
    if share is not None and share < WEAK_SHARE:
        details.append(weak)
        fixes.append(WEAK_FIX)
    elif weak:
        details[0] += f"; {weak}"
    return ("warn" if fixes else "pass"), ", ".join(details), "; ".join(fixes)


def weak_slice_share(teacher: Teacher, rollouts: list[Rollout]) -> tuple[str, float | None]:
    """What share of the teacher's errors in ``rollouts`` lie in its weak slices, said and as a number.

    Returns:
        ``("", None)`` when it made no error; else the sentence and the share (0 without ``weak_slices``).

    """
    tasks = [r.task for r in rollouts]
    errors = [r.task for r in rollouts if not r.outcome["correct"]]
    if not errors:
        return "", None
    declared = dict(teacher.weak_slices)
    outside = [t for t in errors if not teacher.in_weak_slice(t)]
    share = 1 - len(outside) / len(errors)
    if not declared:
        return f"{len(errors)} errors but no weak_slices declared{_worst_tag(outside, tasks)}", 0.0
    said = f"{100 * share:.1f}% of its {len(errors)} errors in weak_slices {declared}"
    if share < WEAK_SHARE:
        said += f" (at least {100 * WEAK_SHARE:.0f}%){_worst_tag(outside, tasks)}"
    return said, share


def _worst_tag(errors: list[Task], tasks: list[Task]) -> str:
    """``; wrong on 100% of key=value (n tasks)``: the ``Task.info`` tag the errors cluster on."""

    def tags(t: Task) -> list[str]:
        return [f"{k}={v}" for k, v in t.info.items() if isinstance(v, str | int | float | bool)]

    wrong = Counter(tag for t in errors for tag in tags(t))
    every = Counter(tag for t in tasks for tag in tags(t))
    if not wrong:
        return ""
    tag = max(wrong, key=lambda k: (wrong[k] / every[k], wrong[k]))
    return f"; wrong on {100 * wrong[tag] / every[tag]:.0f}% of {tag} ({every[tag]} tasks)"
