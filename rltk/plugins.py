"""Plugin lookup: env classes and reward functions by the name a recipe gives them.

A name resolves, first match wins, through

1. the explicit registry: :func:`register_env` / :func:`register_reward` (both usable as decorators),
2. installed entry points, groups ``rltk.envs`` and ``rltk.rewards`` (rltk's own are declared in its
   pyproject.toml), then
3. an import path ``pkg.module:name``.

An unknown name raises :class:`PluginError` listing the valid names, the closest one and how to add a plugin.
Listing (``rltk envs list``) loads every entry point but reports one that fails as
``failed to load: ...`` instead of failing the whole listing. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

from rltk.contract import EnvContractError, class_problems, description_of
from rltk.env import Env

Kind = Literal["env", "reward"]
RewardFn = Callable[..., "float | None"]
"""``fn(completion, reference, outcome, **params) -> float | None``, or TRL's batch form
``fn(prompts, completions, **kwargs) -> list[float | None]`` (see rltk/reward_contract.py)."""

GROUPS: dict[str, str] = {"env": "rltk.envs", "reward": "rltk.rewards"}
"""Entry-point group per plugin kind."""

_EXAMPLE = {"env": "my_pkg.my_module:MyEnv", "reward": "my_pkg.my_module:my_reward"}
_REGISTRY: dict[str, dict[str, Any]] = {"env": {}, "reward": {}}


class PluginError(LookupError, ValueError):
    """A plugin name that does not resolve; ``why`` and ``fix`` are also kept apart for config messages."""

    def __init__(self, kind: str, name: str, why: str, fix: str) -> None:
        self.kind, self.name, self.why, self.fix = kind, name, why, fix
        super().__init__(f"{kind} {name!r}: {why} → {fix}")


def register_env(cls: type[Env] | None = None, *, name: str | None = None) -> Any:
    """Register an :class:`~rltk.env.Env` subclass under ``name`` (default: its ``name`` class attribute).

    Usable as ``@register_env``, ``@register_env(name="x")`` or ``register_env(MyEnv)``; returns the class.

    Raises:
        TypeError: If ``cls`` is not an ``Env`` subclass or has no name.

    """
    if cls is None:
        return lambda c: register_env(c, name=name)
    if not (inspect.isclass(cls) and issubclass(cls, Env)):
        raise TypeError(f"register_env takes an rltk.env.Env subclass, got {cls!r}")
    key = name or getattr(cls, "name", None)
    if not isinstance(key, str) or not key:
        raise TypeError(f"{cls.__qualname__} has no `name` class attribute; set one or pass name=")
    _register("env", key, cls)
    return cls


def register_reward(fn: RewardFn | str | None = None, name: str | None = None) -> Any:
    """Register a reward function under ``name`` (default: the function's ``__name__``).

    Usable as ``@register_reward``, ``@register_reward("x")``, ``@register_reward(name="x")`` or
    ``register_reward(fn, "x")``; returns the function unchanged.

    Raises:
        TypeError: If ``fn`` is not callable.

    """
    if isinstance(fn, str):
        fn, name = None, fn
    if fn is None:
        return lambda f: register_reward(f, name)
    if not callable(fn):
        raise TypeError(f"register_reward takes a callable, got {fn!r}")
    _register("reward", name or fn.__name__, fn)
    return fn


def _register(kind: str, name: str, obj: Any) -> None:
    old = _REGISTRY[kind].get(name)
    if old is not None and old is not obj:
        warnings.warn(f"{kind} {name!r}: replacing {old!r} with {obj!r} in the registry", stacklevel=3)
    _REGISTRY[kind][name] = obj


def get_env(name: str) -> type[Env]:
    """Return the env class registered, declared or importable as ``name``.

    Raises:
        PluginError: If the name is unknown, its entry point or module fails to load, or it is not an Env.

    Examples:
        >>> get_env("rltk.env:SingleTurnEpisode")
        Traceback (most recent call last):
        ...
        rltk.plugins.PluginError: env 'rltk.env:SingleTurnEpisode': not an rltk.env.Env subclass → ...

    """
    return _lookup("env", name)


def make_env(name: str, options: Mapping[str, Any] | None = None) -> Env:
    """Look up env ``name`` and build it with ``options`` (a recipe's ``env.options``).

    Raises:
        PluginError: If the name does not resolve, or the env rejects its options (an unknown option or a bad
            value; the message is the env's own, which names the valid ones).
        EnvContractError: If the class breaks the env contract (``default_rewards`` not a dict, ...).

    Examples:
        >>> make_env("policy_flagging", {"difficulty": "hard"})
        Traceback (most recent call last):
        ...
        rltk.plugins.PluginError: env 'policy_flagging': rejected options {'difficulty': 'hard'}: ...

    """
    cls = get_env(name)
    problems = class_problems(cls)
    if problems:
        raise EnvContractError(name, "; ".join(w for w, _ in problems), "; ".join(f for _, f in problems))
    options = dict(options or {})
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        fix = _options_fix(cls, options) + "fix env.options (rltk eval: --env-options)"
        raise PluginError("env", name, f"rejected options {options}: {exc}", fix) from exc


def _options_fix(cls: type[Env], options: Mapping[str, Any]) -> str:
    """The start of the fix for options an env rejected: a did-you-mean for each unknown one, the valid ones.

    Empty when the constructor takes ``**kwargs`` (no list of valid options) or every option is known.
    """
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return ""
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return ""
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in valid]
    if not unknown:
        return ""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), valid, n=1)
        hints.append(f"unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "; ".join(hints) + f"; valid options: {', '.join(valid) or 'none'}; "


def get_reward(name: str) -> RewardFn:
    """Return the reward function registered, declared or importable as ``name``.

    Raises:
        PluginError: If the name is unknown, its entry point or module fails to load, or it is not callable.

    """
    return _lookup("reward", name)


def resolve(kind: str, name: str) -> Any:
    """Look up a plugin of ``kind`` (``"env"`` or ``"reward"``): the resolver ``Config.validate`` takes."""
    if kind not in GROUPS:
        raise ValueError(f"unknown plugin kind {kind!r}; expected one of {sorted(GROUPS)}")
    return _lookup(kind, name)


def list_envs() -> dict[str, str]:
    """Map every known env name to its one-line ``description`` (or ``failed to load: ...``).

    An env that sets no ``description`` shows its own docstring's first line; one with neither says so.
    """
    missing = "(no description: set the env class's `description` attribute)"
    return _listing("env", lambda cls: [description_of(cls) or missing])


def list_rewards() -> dict[str, str]:
    """Map every known reward name to its one-line description, or ``failed to load: ...``.

    The description is ``@reward_fn(description=...)``'s, else the docstring's first line.
    """
    return _listing(
        "reward", lambda fn: (getattr(fn, "reward_description", "") or inspect.getdoc(fn) or "").splitlines()
    )


def _entry_points(kind: str) -> dict[str, importlib.metadata.EntryPoint]:
    """Map each name in the kind's entry-point group to its entry point (the first, if declared twice)."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=GROUPS[kind]):
        found.setdefault(ep.name, ep)
    return found


def _listing(kind: str, lines: Callable[[Any], list[str]]) -> dict[str, str]:
    out = {name: (lines(obj) or [""])[0] for name, obj in _REGISTRY[kind].items()}
    for name, ep in _entry_points(kind).items():
        if name not in out:
            try:
                out[name] = (lines(_checked(kind, name, ep.load())) or [""])[0]
            except Exception as exc:  # one broken plugin must not hide the others
                out[name] = f"failed to load: {type(exc).__name__}: {exc}"
    return dict(sorted(out.items()))


def _lookup(kind: str, name: str) -> Any:
    if name in _REGISTRY[kind]:
        return _REGISTRY[kind][name]
    eps = _entry_points(kind)
    if name in eps:
        ep = eps[name]
        try:
            obj = ep.load()
        except Exception as exc:
            why = f"entry point {ep.value!r} ({ep.group}) failed to load: {type(exc).__name__}: {exc}"
            dist = getattr(ep.dist, "name", None) or "the package declaring it"
            raise PluginError(kind, name, why, f"fix or reinstall {dist}") from exc
        return _checked(kind, name, obj)
    if isinstance(name, str) and ":" in name:
        return _checked(kind, name, _import(kind, name))
    known = sorted({*_REGISTRY[kind], *eps})
    close = difflib.get_close_matches(str(name), known, n=1)
    fix = (f"did you mean '{close[0]}'? " if close else "") + f"valid {kind}s: {', '.join(known) or 'none'}"
    fix += (
        f"; to add one: decorate it with rltk.plugins.register_{kind}, declare an entry point in group "
        f'"{GROUPS[kind]}" (e.g. [project.entry-points."{GROUPS[kind]}"] my_{kind} = "{_EXAMPLE[kind]}"), '
        f"or give its import path {_EXAMPLE[kind]}"
    )
    raise PluginError(kind, name, f"unknown {kind}", fix)


def _import(kind: str, name: str) -> Any:
    """Import ``pkg.module:attr`` (``attr`` may be dotted)."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise PluginError(kind, name, "malformed import path", f"write it as {_EXAMPLE[kind]}")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        why = f"cannot import module '{module_name}': {type(exc).__name__}: {exc}"
        raise PluginError(kind, name, why, "install the package or put it on PYTHONPATH") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=1)
            fix = (
                f"did you mean '{close[0]}'?"
                if close
                else f"it defines: {', '.join(public[:20]) or 'nothing'}"
            )
            raise PluginError(kind, name, f"module '{module_name}' has no attribute '{attr}'", fix)
        obj = getattr(obj, part)
    return obj


def _checked(kind: str, name: str, obj: Any) -> Any:
    """Return ``obj`` if it is a usable plugin of ``kind``, else raise PluginError."""
    if kind == "env":
        if not (inspect.isclass(obj) and issubclass(obj, Env)):
            raise PluginError(kind, name, "not an rltk.env.Env subclass", "point it at a class deriving Env")
        if inspect.isabstract(obj):
            missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
            raise PluginError(kind, name, f"abstract class (missing {missing})", "implement those methods")
    elif not callable(obj):
        why = f"not callable ({type(obj).__name__})"
        fix = "point it at fn(completion, reference, outcome, **params) or fn(prompts, completions, **kwargs)"
        raise PluginError(kind, name, why, fix)
    return obj
