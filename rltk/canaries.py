"""Reward-hacking canaries: degenerate answers no reward or env verdict should score above a wrong one.

    canaries(env, task, oracle_answer, other_answer) -> [(name, text), ...]

They are generic, built from one task and two well-formed answers (the task's own oracle answer and another
task's, which is a plausible answer in the right format but the wrong one for this task), so any env gets
them without writing its own: ``rltk rewards check`` scores a reward on them (:mod:`rltk.rewardcheck`),
``rltk envs check`` judges an env's verdict on them. An env may add its own (a malformed tool-call loop, a
format-specific hedge) by defining ``canaries(task, oracle_answer) -> list[tuple[str, str]]``; they come
after the generic ones.

What each one tests:

* ``empty``, ``whitespace``: an answer with nothing in it.
* ``echo_prompt``, ``echo_system``: the user prompt (the task's last user turn) or the system prompt
  copied back; a reward that matches keywords of the task finds them all there.
* ``padded``: the oracle answer followed by a long run of filler; a reward that searches the text for the
  answer is fooled, one that parses a whole answer is not.
* ``repeated``: the oracle answer five times.
* ``hedge``: the oracle answer and another task's answer together (both candidates offered).
* ``wrong_answer``: another task's oracle answer alone: the well-formed wrong answer the others are
  compared with (a canary scoring above it rewards a degenerate answer over an honest mistake).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rltk.env import Env, Task

WRONG = "wrong_answer"
"""The name of the well-formed wrong answer among the canaries (the reference the others must not beat)."""

PADDING = "\n" + "Note: this answer is final. " * 80
"""What the ``padded`` canary appends to the oracle answer (about 2,200 characters)."""


def _last(task: Task, role: str) -> str | None:
    found = [m.get("content", "") for m in task.messages if m.get("role") == role]
    return found[-1] if found else None


def canaries(env: Env | None, task: Task, oracle_answer: str, other_answer: str) -> list[tuple[str, str]]:
    r"""The generic canaries of ``task`` as ``(name, text)`` pairs, then the env's own (if it defines any).

    Args:
        env: The env (its optional ``canaries(task, oracle_answer)`` adds env-specific ones); ``None``: the
            generic canaries only.
        task: The task the answers are for (its messages give the echo canaries).
        oracle_answer: The task's correct final answer (its oracle's last turn).
        other_answer: A well-formed answer that is wrong for ``task``: typically another task's oracle answer
            that the env judges incorrect here (:func:`pick_wrong_answer` finds one).

    Returns:
        ``(name, text)`` pairs; the well-formed wrong answer is named :data:`WRONG`. ``echo_system`` is
        left out when the task has no system prompt.

    >>> from rltk.env import Task
    >>> t = Task("t/0", "eval", [{"role": "system", "content": "Be brief."},
    ...                          {"role": "user", "content": "2+2?"}], {"answer": "4"})
    >>> [name for name, _ in canaries(None, t, "4", "5")]
    ['empty', 'whitespace', 'echo_prompt', 'echo_system', 'padded', 'repeated', 'hedge', 'wrong_answer']
    >>> dict(canaries(None, t, "4", "5"))["hedge"]
    '4\n5'

    """
    out = [("empty", ""), ("whitespace", " \n\t \n")]
    user = _last(task, "user")
    if user is not None:
        out.append(("echo_prompt", user))
    system = _last(task, "system")
    if system is not None:
        out.append(("echo_system", system))
    out += [
        ("padded", oracle_answer + PADDING),
        ("repeated", "\n".join([oracle_answer] * 5)),
        ("hedge", f"{oracle_answer}\n{other_answer}"),
        (WRONG, other_answer),
    ]
    extra: Callable[..., Sequence[tuple[str, str]]] | None = getattr(env, "canaries", None)
    if extra is not None:
        out += [(str(name), str(text)) for name, text in extra(task, oracle_answer)]
    return out


def pick_wrong_answer(
    env: Env, task: Task, candidates: Sequence[str], oracle_answer: str | None = None
) -> str | None:
    """The first of ``candidates`` that is a wrong answer for ``task``, or ``None``.

    A candidate equal to ``oracle_answer`` is skipped; for single-turn envs so is one the env judges correct
    (``env.check(task, text)["correct"] is True``: another task's answer can be right here too, e.g. the
    same label). A check that raises is taken as "not correct".

    Args:
        env: The env whose verdict decides.
        task: The task.
        candidates: Other tasks' oracle answers, in order of preference.
        oracle_answer: This task's oracle answer.

    """
    for text in candidates:
        if text == oracle_answer:
            continue
        if env.max_turns == 1:
            try:
                verdict: Any = env.check(task, text)
            except Exception:  # a wrong answer all the same
                verdict = {}
            if isinstance(verdict, Mapping) and verdict.get("correct") is True:
                continue
        return text
    return None


def final_turn(env: Env, task: Task, policy: Callable[[list[dict[str, str]]], str]) -> str:
    """The last assistant turn of ``policy``'s episode of ``task`` (for the oracle: its final answer).

    >>> from rltk_envs.policy_flagging import PolicyFlaggingEnv
    >>> env = PolicyFlaggingEnv()
    >>> task = env.tasks("eval", 1)[0]
    >>> final_turn(env, task, env.oracle) == env.oracle(task.messages)
    True
    """
    from rltk.env import run_policy

    actions = run_policy(env, task, policy).actions
    return actions[-1] if actions else ""
