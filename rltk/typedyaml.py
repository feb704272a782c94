"""Typed dataclasses from YAML: the generic machinery behind :mod:`rltk.config`.

Builds a dataclass tree from parsed YAML (reporting unknown keys with the closest valid name, and keys a
dataclass lists in its ``RENAMED`` class attribute with their new name), checks every value against its
type hint and its declared range, reads YAML files (duplicate keys and syntax errors become problems with
line and column) and applies ``a.b=value`` overrides. Nothing raises: every problem is appended to a list,
one line each, ``field.path: value (why) → fix``, so a caller reports them all at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from collections.abc import Hashable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


def _show(value: Any) -> str:
    """Spell a bad value for a message: ``true``, ``null``, ``'text'``, ``[1, 2]``."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def _cli(value: Any) -> str:
    """Spell a value as an override would: ``grpo``, ``1.0e-05``, ``[jsonl]``."""
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("...\n").strip()


def problem(path: str, value: Any, why: str, fix: str) -> str:
    """One problem line: ``path: value (why) → fix``."""
    return f"{path}: {_show(value)} ({why}) → {fix}"


def one_of(choices: Any, value: Any = None) -> str:
    """``did you mean 'x'? valid: a, b, c`` for a value that is not one of ``choices``."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), names, n=1) if value is not None else []
    return (f"did you mean '{close[0]}'? " if close else "") + f"valid: {', '.join(names)}"


def join_path(path: str, key: Any) -> str:
    """``a.b`` + ``c`` → ``a.b.c`` (no leading dot at the root)."""
    return f"{path}.{key}" if path else str(key)


def _in_bounds(value: Any, bounds: str) -> bool:
    """Whether ``value`` (or each item of a tuple) is within ``bounds``.

    >>> _in_bounds(1.0, "(0, 1]"), _in_bounds(0, "> 0"), _in_bounds((0.9, 1.0), "[0, 1)")
    (True, False, False)
    """
    if isinstance(value, tuple | list):
        return all(_in_bounds(v, bounds) for v in value)
    if bounds == "nonempty" or value is None:
        return bool(value) or value is None
    if bounds[0] in "([":
        lo, hi = (float(x) for x in bounds[1:-1].split(","))
        return (lo < value if bounds[0] == "(" else lo <= value) and (
            value < hi if bounds[-1] == ")" else value <= hi
        )
    op, num = bounds.split()
    return value > float(num) if op == ">" else value >= float(num)


# ----------------------------------------------------------------------------------------- build + check
_FLOAT_STR = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_TYPE_NAMES = {bool: "a bool (true/false)", int: "an int", float: "a number", str: "a string"}


def _optional(hint: Any) -> tuple[Any, bool]:
    """Split ``X | None`` into ``(X, True)``; any other hint gives ``(hint, False)``."""
    if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
        return next(a for a in get_args(hint) if a is not type(None)), True
    return hint, False


def _convert(value: Any, hint: Any, path: str, problems: list[str]) -> Any:
    """Coerce losslessly from YAML (numbers to float/str, lists to tuples); keep anything else for check."""
    hint, _ = _optional(hint)
    origin, args = get_origin(hint), get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path, problems)
    if origin in (list, tuple) and isinstance(value, list | tuple):
        items = [
            _convert(v, args[min(i, len(args) - 1)], join_path(path, i), problems)
            for i, v in enumerate(value)
        ]
        return tuple(items) if origin is tuple else items
    if hint is float and (type(value) is int or (isinstance(value, str) and _FLOAT_STR.match(value))):
        return float(value)
    if origin is Literal and isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
        # YAML 1.1 reads a bare no/off/yes/on as a bool: give back the word where it is a valid choice
        word = next(
            (w for w in (("yes", "on", "true") if value else ("no", "off", "false")) if w in args), None
        )
        return value if word is None else word
    return str(value) if hint is str and type(value) in (int, float) else value


def build(cls: Any, data: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass ``cls`` from a mapping (``None``: an empty section), reporting unknown keys.

    Anything else is returned as is, for :func:`check` to report.
    """
    if not isinstance(data, Mapping):
        return cls() if data is None else data
    hints, names = get_type_hints(cls), [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key in names:  # fields only (a ClassVar such as RENAMED has a hint too)
            kwargs[key] = _convert(value, hints[key], join_path(path, key), problems)
            continue
        renamed = getattr(cls, "RENAMED", {}).get(key)
        if renamed is not None:  # a key an older rltk wrote (a run dir's config.yaml)
            new = join_path(path, renamed)
            problems.append(f"{join_path(path, key)}: renamed {new} in this rltk → write {new}")
            continue
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        problems.append(f"{join_path(path, key)}: unknown key{hint} (valid keys: {', '.join(names)})")
    return cls(**kwargs)


def check(
    value: Any, hint: Any, path: str, meta: Mapping[str, Any], problems: list[str], bad: set[str]
) -> None:
    """Report ``value`` if not a ``hint`` or out of ``meta["bounds"]``; recurse; add bad paths to ``bad``."""
    hint, nullable = _optional(hint)
    origin, args = get_origin(hint), get_args(hint)
    why = fix = ""
    if value is None and nullable:
        pass
    elif dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            why, fix = "expected a mapping", f"write {path or 'the recipe'} as 'key: value' lines"
        else:
            defaults, hints = hint(), get_type_hints(hint)
            for f in fields(hint):
                sub_meta = {**f.metadata, "default": getattr(defaults, f.name)}
                check(getattr(value, f.name), hints[f.name], join_path(path, f.name), sub_meta, problems, bad)
    elif origin is Literal:
        if value not in args or isinstance(value, bool):
            why, fix = "not a valid choice", one_of(args, value)
    elif origin in (list, tuple):
        if not isinstance(value, list | tuple) or (origin is tuple and len(value) != len(args)):
            why = f"expected a list of {len(args)}" if origin is tuple else "expected a list"
        else:
            n = len(bad)
            for i, item in enumerate(value):
                check(item, args[min(i, len(args) - 1)], join_path(path, i), {}, problems, bad)
            if len(bad) > n:  # the items are reported; the list is bad too, so its bounds are not checked
                bad.add(path)
                return
    elif origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            why = "expected a mapping with string keys"
    elif hint in _TYPE_NAMES:
        good = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        if hint is float:
            good = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        why = "" if good else f"expected {_TYPE_NAMES[hint]}, got {type(value).__name__}"
    bounds = meta.get("bounds")
    if not why and bounds and not _in_bounds(value, bounds):
        shown = "not empty" if bounds == "nonempty" else f"in {bounds}" if bounds[0] in "([" else bounds
        why = f"must be {shown}" + (f"; {meta['note']}" if meta.get("note") else "")
    if why:
        default = meta.get("default")
        if not fix:
            fix = f"e.g. {path}={_cli(default)}" if default not in (None, "") else "see docs/contracts.md"
        bad.add(path)
        problems.append(problem(path, value, why, fix))


# ----------------------------------------------------------------------------------------- sources
class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        for i, key in enumerate(keys):
            if isinstance(key, Hashable) and key in keys[:i]:
                mark = node.value[i][0].start_mark
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    """Read the recipe's top-level mapping; a missing file, bad YAML or a non-mapping become problems."""
    if not path.is_file():
        siblings = sorted(p.name for p in path.parent.glob("*.y*ml")) if path.parent.is_dir() else []
        close = difflib.get_close_matches(path.name, siblings, n=1)
        fix = (
            f"did you mean {path.parent / close[0]}?" if close else f"found: {', '.join(siblings) or 'none'}"
        )
        problems.append(f"{path}: recipe file not found → check the path; {fix}")
        return {}
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "the file"
        why = getattr(exc, "problem", None) or str(exc)
        problems.append(f"{where}: not valid YAML ({why}) → fix the syntax at {at}")
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read the recipe ({exc}) → check the file's permissions and encoding")
        return {}
    if data is None or isinstance(data, dict):
        return data or {}
    why = f"the top level is a {type(data).__name__}; a recipe must be a mapping of sections"
    problems.append(f"{path}: {_show(data)[:60]} ({why}) → write sections such as 'run:' and 'rollout:'")
    return {}


def apply_override(raw: dict[str, Any], item: str, problems: list[str]) -> None:
    """Set ``a.b.c=value`` in ``raw``, creating mappings (or lists, before numeric keys) on the way."""
    key, eq, text = item.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        why = "missing '='" if not eq else "empty key"
        problems.append(f"override {item!r}: {why} → write key=value, e.g. run.steps=3 or rewards.0.weight=2")
        return
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        value = text
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        child: Any = value if last else ([] if parts[i + 1].isdigit() else {})
        if isinstance(node, list) and part.isdigit() and int(part) <= len(node):
            if int(part) == len(node):
                node.append(child)
            elif last:
                node[int(part)] = child
            node = node[int(part)]
        elif isinstance(node, dict):
            if last or not isinstance(node.get(part), dict | list):
                node[part] = child
            node = node[part]
        else:
            where = ".".join(parts[:i])
            kind = f"a list of {len(node)}" if isinstance(node, list) else f"a {type(node).__name__}"
            why = f"cannot set '{part}' in {where}, which is {kind}"
            problems.append(f"override {item!r}: {where}.{part} ({why}) → check the key and index")
            return


def annotated_yaml(obj: Any, indent: int = 0) -> str:
    """A dataclass tree as YAML, each field's choices, range and note in a comment (``--show-config``).

    >>> @dataclasses.dataclass
    ... class Run:
    ...     steps: int = dataclasses.field(default=100, metadata={"bounds": "> 0", "note": "RL steps"})
    >>> print(annotated_yaml(Run()), end="")
    steps: 100  # > 0; RL steps
    """
    pad, lines, hints = " " * indent, [], get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        hint, _ = _optional(hints[f.name])
        choices = " | ".join(map(_cli, get_args(hint))) if get_origin(hint) is Literal else ""
        notes = (choices, f.metadata.get("bounds", ""), f.metadata.get("note", ""))
        comment = "; ".join(x for x in notes if x)
        tail = f"  # {comment}" if comment else ""
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:{tail}\n{annotated_yaml(value, indent + 2)}")
            continue
        if isinstance(value, list | tuple) and value and dataclasses.is_dataclass(value[0]):
            value = [dataclasses.asdict(v) for v in value]
        lines.append(f"{pad}{f.name}: {_cli(value)}{tail}\n")
    return "".join(lines)
