"""The two forms of reward rltk calls, told apart by the function's signature, and how each is called.

**Per-sample** (rltk's own): ``fn(completion, reference, outcome, **params) -> float | None``, one call per
rollout. The completion goes to the first parameter (any name). ``reference`` (``Task.reference``, read-only),
``outcome`` (the env's verdict, read-only) and ``prompt`` go by name to parameters so named, or into
``**kwargs``; so ``def r(completion, **kw)`` works. The old positional contract still holds for an unnamed
triple: three or more required positional parameters, none named ``reference``, ``outcome`` or ``prompt``
(``lambda c, r, o``), get the completion, ``reference`` and ``outcome`` by position. Every other parameter
is a param the recipe sets (or its default).

**Batch** (TRL's ``GRPOTrainer`` form): ``fn(prompts, completions, **kwargs) -> list[float | None]``, one call
per group of rollouts of a step, every argument by name: ``prompts``, ``completions``, ``completion_ids``
(the model's token ids of each rollout; empty for scripted policies), each field of ``Task.reference`` as a
column (a list, one entry per completion, as TRL passes dataset columns), ``outcome`` (the env's verdicts)
and the recipe's params. A function that names ``prompts``, ``completions`` or ``completion_ids`` is of
this form. It returns one entry per completion: ``None`` = not applicable; a list of another length, or
anything but a list, fails every rollout of the call (kind ``invalid``); a bad entry fails its rollout.

**Format** (``rewards.N.format`` in a recipe, else the reward's ``@reward_fn(format=...)``, else ``text``):
``text`` passes the final assistant turn as a string and the prompt as the task's last user turn (TRL's
standard format); ``messages`` passes ``[{"role": "assistant", "content": <final turn>}]`` and the task's
messages (TRL's conversational format). A reward written for one format mis-scores the other, often
silently (``len()`` of a one-message list is 1): ``rltk rewards check`` flags a reward that scores right
answers, wrong ones and degenerate ones alike.

Async functions (``async def``) are run to completion. :func:`contract_problems` lists what is wrong with
a signature for a recipe's params (config validation); :func:`make_contract` builds the call plan.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from rltk.reward_spec import CONTEXT_NAMES, FORMATS, TRL_NAMES, Format, InvalidScore

if TYPE_CHECKING:
    from rltk.batch import Rollout
    from rltk.env import Message, Task

Form = Literal["sample", "batch"]
BATCH_MARKERS = ("prompts", "completions", "completion_ids")
"""A parameter with one of these names makes a function a batch (TRL) reward."""

SAMPLE_FIX = (
    "a per-sample reward is fn(completion, reference, outcome, **params) -> float | None (reference, outcome "
    "and prompt come by name); a TRL batch reward is fn(prompts, completions, **kwargs) -> list[float | None]"
)


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins, some C callables: called the old positional way
        return None


def form_of(fn: Callable[..., Any]) -> Form:
    """``"batch"`` when ``fn`` names ``prompts``, ``completions`` or ``completion_ids``, else ``"sample"``.

    >>> form_of(lambda completion, **kw: 1.0), form_of(lambda completions, **kwargs: [1.0])
    ('sample', 'batch')
    """
    sig = _signature(fn)
    return "batch" if sig is not None and any(n in sig.parameters for n in BATCH_MARKERS) else "sample"


def resolve_format(fn: Callable[..., Any], format: str | None) -> Format:
    """The format a reward is called with: the recipe's (``text``/``messages``), else its declared one."""
    chosen = format if format not in (None, "", "auto") else getattr(fn, "reward_format", None) or "text"
    if chosen not in FORMATS:
        raise ValueError(f"reward format must be one of {FORMATS} (or auto), got {chosen!r}")
    return chosen  # type: ignore[return-value]


@dataclass(frozen=True)
class Contract:
    """How to call one reward: its form, its format and where each argument goes.

    Attributes:
        form: ``"sample"`` or ``"batch"``.
        format: ``"text"`` or ``"messages"``.
        positional: Per-sample: the context names passed by position after the completion (old contract).
        keywords: The context names (per-sample) or TRL names (batch) passed by name.
        any_keyword: The function takes ``**kwargs`` (batch: every reference column is passed).
        accepted: The parameter names it takes by keyword (batch: which reference columns to pass).

    """

    form: Form
    format: Format
    positional: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    any_keyword: bool = True
    accepted: frozenset[str] = frozenset()


def _params(sig: inspect.Signature) -> list[inspect.Parameter]:
    return list(sig.parameters.values())


def _sample_plan(ps: list[inspect.Parameter], params: Collection[str]) -> tuple[tuple[str, ...], list[str]]:
    """Per-sample: the context names passed by position (old contract), and the parameters left unfilled.

    Position fills ``reference`` and ``outcome`` only where the 2nd and 3rd parameters carry those names,
    or for the old unnamed triple ``(c, r, o)``: at least three required positional parameters, none named
    ``reference``, ``outcome`` or ``prompt``. Any other parameter is a param: ``(completion, reference,
    tolerance)`` asks the recipe for ``tolerance`` instead of silently receiving the outcome there.
    """
    positional: list[str] = []
    for p, ctx in zip(ps[1:3], ("reference", "outcome"), strict=False):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) or p.name != ctx:
            break
        positional.append(ctx)
    unnamed_triple = (
        len(ps) >= 3
        and not {p.name for p in ps} & set(CONTEXT_NAMES)
        and all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is p.empty
            and p.name not in params
            for p in ps[1:3]
        )
    )
    if unnamed_triple:
        positional = ["reference", "outcome"]
    by_name = [n for n in CONTEXT_NAMES if n not in positional]
    missing = [
        p.name
        for p in ps[1 + len(positional) :]
        if p.kind is p.POSITIONAL_ONLY
        or (
            p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in by_name
            and p.name not in params
        )
    ]
    return tuple(positional), missing


def contract_problems(
    fn: Callable[..., Any],
    params: Mapping[str, Any],
    format: str | None = None,
    columns: Collection[str] | None = None,
) -> list[tuple[str, str, str]]:
    """What keeps ``fn`` from being called with ``params``: ``(param or "", why, fix)`` per problem.

    Args:
        fn: The reward function.
        params: The recipe's params for it (with the env's defaults).
        format: The recipe's format (``text``, ``messages``, ``auto``/``None``: the declared one).
        columns: The reference fields of the env's tasks (batch rewards get them as columns); ``None``:
            unknown, not checked.

    >>> contract_problems(lambda completion, reference, outcome, threshold: 1.0, {})  # doctest: +ELLIPSIS
    [('threshold', "required parameter 'threshold' gets no value", 'set rewards.N.params.threshold...')]
    >>> contract_problems(lambda completions, solution, **kw: [1.0], {}, columns=["answer"])[0][1]
    "required parameter 'solution' gets no value: the env's tasks have no reference field 'solution'"

    """
    out: list[tuple[str, str, str]] = []
    try:
        resolve_format(fn, format)
    except ValueError as e:
        out.append(("format", str(e), "use format: text or format: messages"))
    sig = _signature(fn)
    if sig is None:
        return out
    ps, form = _params(sig), form_of(fn)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in ps)
    reserved = set(TRL_NAMES) | {"outcome"} if form == "batch" else set(CONTEXT_NAMES)
    for key in params:
        if key in reserved or (form == "sample" and ps and key == ps[0].name):
            why = f"'{key}' is an argument rltk passes ({form} form), not a param"
            out.append((key, why, f"remove rewards.N.params.{key}"))
    takes = [p.name for p in ps if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in params:
        if key in takes or key in reserved:
            continue
        hint = difflib.get_close_matches(key, takes, n=1)
        valid = ", ".join(n for n in takes if n not in reserved and (not ps or n != ps[0].name))
        did = f"did you mean '{hint[0]}'? " if hint else ""
        if not var_kw:
            out.append((key, "not a parameter of the reward", f"{did}valid params: {valid or '(none)'}"))
        elif hint:  # **kwargs would take the typo and nothing would read it
            why = f"not a parameter of the reward (its **kwargs would take it, unread), close to '{hint[0]}'"
            out.append((key, why, f"{did}rename it, or name it in the reward's signature"))
    if form == "batch":
        out += _batch_problems(ps, params, columns)
    else:
        out += _sample_problems(ps, params)
    return out


def _sample_problems(ps: list[inspect.Parameter], params: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    if not ps or ps[0].kind not in (ps[0].POSITIONAL_ONLY, ps[0].POSITIONAL_OR_KEYWORD, ps[0].VAR_POSITIONAL):
        why = "it takes no positional first parameter for the completion"
        return [("", why, SAMPLE_FIX)]
    _, missing = _sample_plan(ps, params)
    out = []
    for name in missing:
        close = difflib.get_close_matches(name, [*CONTEXT_NAMES, *BATCH_MARKERS], n=1)
        did = f"rename it '{close[0]}', or " if close else ""
        fix = f"{did}set rewards.N.params.{name}, or give it a default ({SAMPLE_FIX})"
        out.append((name, f"required parameter '{name}' gets no value", fix))
    return out


def _batch_problems(
    ps: list[inspect.Parameter], params: Mapping[str, Any], columns: Collection[str] | None
) -> list[tuple[str, str, str]]:
    out = []
    for p in ps:
        if p.kind is p.POSITIONAL_ONLY:
            why = f"positional-only parameter '{p.name}': TRL-style rewards get every argument by name"
            out.append((p.name, why, "remove the '/' from its signature"))
        elif p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            passed = {*BATCH_MARKERS, "outcome", *params}
            if p.name in passed or columns is None or p.name in columns:
                continue
            why = f"required parameter '{p.name}' gets no value"
            if p.name in TRL_NAMES:
                why += f": rltk does not pass TRL's '{p.name}'"
                fix = "give it a default (None)"
            else:
                why += f": the env's tasks have no reference field '{p.name}'"
                close = difflib.get_close_matches(p.name, list(columns), n=1)
                did = f"did you mean '{close[0]}'? " if close else ""
                cols = ", ".join(sorted(columns)) or "(none)"
                fix = f"{did}its reference fields are: {cols}; or set rewards.N.params.{p.name}"
            out.append((p.name, why, fix))
    return out


def make_contract(fn: Callable[..., Any], params: Mapping[str, Any], format: str | None = None) -> Contract:
    """The call plan of ``fn`` with ``params``.

    Raises:
        ValueError: Naming every problem :func:`contract_problems` finds (reference columns unchecked).

    """
    problems = contract_problems(fn, params, format)
    if problems:
        raise ValueError("; ".join(f"{p + ': ' if p else ''}{why} → {fix}" for p, why, fix in problems))
    fmt, sig = resolve_format(fn, format), _signature(fn)
    if sig is None:
        return Contract("sample", fmt, ("reference", "outcome"))
    ps = _params(sig)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in ps)
    accepted = frozenset(p.name for p in ps if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    if form_of(fn) == "batch":
        keywords = tuple(n for n in (*BATCH_MARKERS, "outcome") if var_kw or n in accepted)
        return Contract("batch", fmt, (), keywords, var_kw, accepted)
    positional, _ = _sample_plan(ps, params)
    rest = accepted - {ps[0].name}
    keywords = tuple(n for n in CONTEXT_NAMES if n not in positional and (var_kw or n in rest))
    return Contract("sample", fmt, positional, keywords, var_kw, accepted)


def completion_arg(text: str, format: Format) -> str | list[Message]:
    """The completion as the format passes it: the text, or ``[{"role": "assistant", "content": text}]``."""
    return text if format == "text" else [{"role": "assistant", "content": text}]


def prompt_arg(task: Task, format: Format) -> str | list[Message]:
    """The prompt as the format passes it: the task's last user turn, or a copy of its messages."""
    if format == "messages":
        return [dict(m) for m in task.messages]
    users = [m.get("content", "") for m in task.messages if m.get("role") == "user"]
    return users[-1] if users else ""


def _final(rollout: Rollout) -> str:
    return rollout.turns[-1] if rollout.turns else ""


def sample_args(contract: Contract, rollout: Rollout) -> tuple[Any, ...]:
    """The picklable arguments of one per-sample call: ``(completion, reference, outcome, prompt)``."""
    return (
        completion_arg(_final(rollout), contract.format),
        dict(rollout.task.reference),
        dict(rollout.outcome),
        prompt_arg(rollout.task, contract.format) if "prompt" in contract.keywords else None,
    )


def batch_kwargs(contract: Contract, rollouts: Sequence[Rollout]) -> dict[str, Any]:
    """The picklable keyword arguments of one batch call over ``rollouts`` (reserved names win)."""
    out: dict[str, Any] = {}
    keys = {k for r in rollouts for k in r.task.reference}
    for key in sorted(keys):
        if contract.any_keyword or key in contract.accepted:
            out[key] = [r.task.reference.get(key) for r in rollouts]
    full: dict[str, Callable[[Rollout], Any]] = {
        "prompts": lambda r: prompt_arg(r.task, contract.format),
        "completions": lambda r: completion_arg(_final(r), contract.format),
        "completion_ids": lambda r: r.token_ids[r.loss_mask.bool()].tolist() if len(r.loss_mask) else [],
        "outcome": lambda r: dict(r.outcome),
    }
    for key in contract.keywords:
        out[key] = [full[key](r) for r in rollouts]
    return out


def _settle(value: Any) -> Any:
    return asyncio.run(value) if inspect.isawaitable(value) else value


def call_sample(
    fn: Callable[..., Any],
    contract: Contract,
    params: Mapping[str, Any],
    completion: Any,
    reference: Mapping[str, Any],
    outcome: Mapping[str, Any],
    prompt: Any = None,
) -> Any:
    """One per-sample call, with read-only views of the task's data."""
    ctx = {"reference": MappingProxyType(dict(reference)), "outcome": MappingProxyType(dict(outcome))}
    ctx["prompt"] = prompt
    args = [completion, *(ctx[n] for n in contract.positional)]
    return _settle(fn(*args, **{n: ctx[n] for n in contract.keywords}, **params))


def call_batch(fn: Callable[..., Any], params: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Any:
    """One batch call: ``fn(**kwargs, **params)`` (params win over a reference column of the same name)."""
    return _settle(fn(**{**kwargs, **params}))


def split_batch(value: Any, n: int) -> list[Any]:
    """A batch reward's return as ``n`` per-rollout values; a wrong shape gives ``n`` :class:`InvalidScore`.

    >>> split_batch([1.0, None], 2)
    [1.0, None]
    >>> split_batch([1.0], 2)[0]
    InvalidScore('returned 1 scores for 2 completions; a batch reward returns one per completion')
    """
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = list(value)
    if not isinstance(value, (list, tuple)):
        bad = InvalidScore(
            f"returned {type(value).__name__}, not a list; a batch reward returns list[float | None]"
        )
        return [bad] * n
    if len(value) != n:
        bad = InvalidScore(
            f"returned {len(value)} scores for {n} completions; a batch reward returns one per completion"
        )
        return [bad] * n
    return list(value)


def invoke(
    fn: Callable[..., Any], contract: Contract, params: Mapping[str, Any], *args: Any, **kwargs: Any
) -> Any:
    """One call of either form: ``args`` from :func:`sample_args`, or ``kwargs`` from :func:`batch_kwargs`."""
    if contract.form == "batch":
        return call_batch(fn, params, kwargs)
    return call_sample(fn, contract, params, *args)


def payloads(
    contract: Contract, groups: Sequence[Sequence[Rollout]]
) -> list[tuple[tuple[Any, ...], dict[str, Any], int]]:
    """The calls scoring ``groups`` takes: ``(args, kwargs, rollouts covered)``, one per rollout or group."""
    if contract.form == "batch":
        return [((), batch_kwargs(contract, g), len(g)) for g in groups if g]
    return [(sample_args(contract, r), {}, 1) for g in groups for r in g]


def call_one(
    fn: Callable[..., Any],
    completion: str,
    reference: Mapping[str, Any],
    outcome: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    *,
    prompt: str | list[Message] = "",
    format: str | None = None,
) -> Any:
    """Call a reward of either form on one completion, as a rubric would, in this process (no deadline).

    For code that scores an answer outside a rubric (an env's verdict from a named reward). A batch reward
    gets one-entry columns and its one entry is returned (a wrong-shape return: an :class:`InvalidScore`).
    ``prompt`` is passed as given (text or messages).

    >>> call_one(lambda completions, answer, **kw: [float(completions[0] == answer[0])], "4", {"answer": "4"})
    1.0
    >>> call_one(lambda completion, reference, outcome, bonus=0.0: 0.5 + bonus, "4", {}, {}, {"bonus": 0.5})
    1.0
    """
    params, outcome = dict(params or {}), dict(outcome or {})
    contract = make_contract(fn, params, format)
    text = completion_arg(completion, contract.format)
    if contract.form == "sample":
        return call_sample(fn, contract, params, text, reference, outcome, prompt)
    columns = {k: [v] for k, v in reference.items() if contract.any_keyword or k in contract.accepted}
    passed = {"prompts": [prompt], "completions": [text], "completion_ids": [[]], "outcome": [outcome]}
    kwargs = {**columns, **{k: passed[k] for k in contract.keywords}}
    return split_batch(call_batch(fn, params, kwargs), 1)[0]
