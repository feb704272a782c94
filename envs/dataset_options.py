"""The options of the ``dataset`` env, checked all at once before any file is read.

Every problem found is listed in one ``ValueError`` (the option, the bad value, the fix), so a recipe is
fixed in one go rather than one error per run. Column names are checked against the file afterwards by
:func:`check_columns`, which names the columns the file has.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rltk_envs.dataset_checks import CHECKS
from rltk_envs.dataset_load import FORMATS

BAD_ROWS = ("skip", "error")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class Options:
    """The validated options (see :class:`rltk_envs.dataset.DatasetEnv` for each one's meaning)."""

    path: str
    format: str | None
    source_split: str | None
    prompt_column: str | None
    prompt_template: str | None
    template_fields: tuple[str, ...]
    system: str | None
    reference_column: str
    id_column: str | None
    split_column: str | None
    split_ratios: tuple[float, float, float]
    hash_columns: tuple[str, ...] | None
    check: str
    labels: tuple[str, ...] | None
    label_hint: bool
    case_sensitive: bool
    tolerance: float
    rel_tolerance: float
    json_fields: tuple[str, ...] | None
    f1_threshold: float
    reward: str | None
    reward_params: dict[str, Any]
    reward_threshold: float | None
    demo_column: str | None
    max_new_tokens: int | None
    on_bad_rows: str

    @property
    def prompt_columns(self) -> tuple[str, ...]:
        """The columns the prompt reads."""
        return (self.prompt_column,) if self.prompt_column else self.template_fields


def template_fields(template: str) -> tuple[tuple[str, ...], str | None]:
    r"""The column names a ``{column}`` template reads, and a problem (None when it is usable).

    >>> template_fields("Q: {question}\nContext: {context}")
    (('question', 'context'), None)
    >>> template_fields("{0} {a.b}")[1]
    "fields must be plain column names in braces, got ['0', 'a.b'] (write {{ and }} for literal braces)"
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return (), f"does not parse: {exc} (write {{{{ and }}}} for literal braces)"
    names = [name for _, name, _, _ in parsed if name is not None]
    bad = [n for n in names if not n or n.isdigit() or any(c in n for c in ".[")]
    bad += [f"{n}!{c}" if c else f"{n}:{s}" for _, n, s, c in parsed if n is not None and (s or c)]
    if bad:
        why = f"fields must be plain column names in braces, got {bad}"
        return (), why + " (write {{ and }} for literal braces)"
    if not names:
        return (), "names no column: write the columns in braces, e.g. 'Q: {question}'"
    return tuple(dict.fromkeys(names)), None


def _str_list(value: Any) -> tuple[str, ...] | None:
    """A list of non-empty strings as a tuple, else None."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    return None


def _ratios(value: Any) -> tuple[float, float, float] | None:
    """Three finite non-negative numbers with a positive sum, as a tuple, else None."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return None
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 for v in value
    ):
        return None
    return (float(value[0]), float(value[1]), float(value[2])) if sum(value) > 0 else None


def _number(value: Any, low: float, high: float = math.inf) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) if low <= value <= high else None


class _Problems:
    """Collects the problems of one set of options: ``need(ok, option, why)`` notes one when not ok."""

    def __init__(self, kw: dict[str, Any]) -> None:
        self.kw, self.found = kw, []

    def need(self, ok: Any, option: str, why: str) -> None:
        if not ok:
            self.found.append(f"{option}={self.kw.get(option)!r}: {why}")


def validate(**kw: Any) -> Options:
    """Check every option; raise one ``ValueError`` listing every problem found.

    Raises:
        ValueError: ``"env 'dataset' options: <problem>; <problem>; ..."``.

    """
    p = _Problems(kw)
    fields = _check_data_options(p)
    ratios = DEFAULT_RATIOS if kw["split_ratios"] is None else _ratios(kw["split_ratios"])
    hash_columns = None if kw["hash_columns"] is None else _str_list(kw["hash_columns"])
    labels = None if kw["labels"] is None else _str_list(kw["labels"])
    json_fields = None if kw["json_fields"] is None else _str_list(kw["json_fields"])
    tolerance, rel = _number(kw["tolerance"], 0.0), _number(kw["rel_tolerance"], 0.0)
    f1 = _number(kw["f1_threshold"], 0.0, 1.0)
    p.need(ratios is not None, "split_ratios", "must be 3 numbers >= 0 (train, eval, test), positive sum")
    p.need(kw["hash_columns"] is None or hash_columns, "hash_columns", "must be a list of column names")
    p.need(kw["labels"] is None or labels, "labels", "must be a list of label strings")
    p.need(kw["json_fields"] is None or json_fields, "json_fields", "must be a list of field names")
    p.need(tolerance is not None, "tolerance", "must be a number >= 0 (absolute tolerance, numeric check)")
    p.need(rel is not None, "rel_tolerance", "must be a number >= 0 (relative tolerance, numeric check)")
    p.need(f1 is not None and f1 > 0, "f1_threshold", "must be a number in (0, 1]")
    _check_check_options(p)
    if p.found:
        raise ValueError("env 'dataset' options: " + "; ".join(p.found))
    return Options(
        path=kw["path"], format=kw["format"], source_split=kw["source_split"],
        prompt_column=kw["prompt_column"], prompt_template=kw["prompt_template"], template_fields=fields,
        system=kw["system"], reference_column=kw["reference_column"], id_column=kw["id_column"],
        split_column=kw["split_column"], split_ratios=ratios or DEFAULT_RATIOS, hash_columns=hash_columns,
        check=kw["check"], labels=labels, label_hint=kw["label_hint"], case_sensitive=kw["case_sensitive"],
        tolerance=tolerance or 0.0, rel_tolerance=rel or 0.0, json_fields=json_fields,
        f1_threshold=f1 or 1.0, reward=kw["reward"], reward_params=dict(kw["reward_params"]),
        reward_threshold=kw["reward_threshold"], demo_column=kw["demo_column"],
        max_new_tokens=kw["max_new_tokens"], on_bad_rows=kw["on_bad_rows"],
    )  # fmt: skip


def _check_data_options(p: _Problems) -> tuple[str, ...]:
    """The file, column, prompt and split options; returns the template's fields (empty without one)."""
    kw, need = p.kw, p.need
    need(isinstance(kw["path"], str) and kw["path"], "path", "required: the data file, e.g. data/tickets.csv")
    need(kw["format"] is None or kw["format"] in FORMATS, "format", f"must be one of {FORMATS} or left out")
    for opt in ("source_split", "system", "id_column", "split_column", "demo_column", "reward"):
        need(kw[opt] is None or (isinstance(kw[opt], str) and kw[opt]), opt, "must be a non-empty string")
    need(
        isinstance(kw["reference_column"], str) and kw["reference_column"],
        "reference_column",
        "required: the column holding the reference answer, e.g. reference_column: label",
    )
    if kw["split_column"] is not None and kw["split_ratios"] is not None:
        p.found.append("split_column and split_ratios: give one (a column of train/eval/test, or ratios)")
    if kw["id_column"] is not None and kw["hash_columns"] is not None:
        p.found.append("id_column and hash_columns: give one (rows are hashed by their id, or by columns)")
    column, template = kw["prompt_column"], kw["prompt_template"]
    if (column is None) == (template is None):
        p.found.append(
            f"prompt_column={column!r}, prompt_template={template!r}: give exactly one, a column "
            "(prompt_column: text) or a template over columns (prompt_template: 'Q: {question}')"
        )
    elif column is not None:
        need(isinstance(column, str) and column, "prompt_column", "must be a column name")
    elif not isinstance(template, str):
        need(False, "prompt_template", "must be a string such as 'Q: {question}'")
    else:
        fields, why = template_fields(template)
        need(why is None, "prompt_template", why or "")
        return fields
    return ()


def _check_check_options(p: _Problems) -> None:
    """The check kind and the options that go with it."""
    kw, need = p.kw, p.need
    check = kw["check"]
    need(check in CHECKS, "check", f"must be one of {CHECKS}")
    need(kw["labels"] is None or check == "choice", "labels", "only check: choice takes labels")
    for opt in ("label_hint", "case_sensitive"):
        need(isinstance(kw[opt], bool), opt, "must be true or false")
    need(
        (kw["reward"] is not None) == (check == "reward"),
        "reward",
        "check: reward needs reward: <a registered reward name>, and only it takes one",
    )
    need(isinstance(kw["reward_params"], dict), "reward_params", "must be a mapping of the reward's params")
    threshold = kw["reward_threshold"]
    need(
        threshold is None or _number(threshold, -math.inf) is not None, "reward_threshold", "must be a number"
    )
    need(
        check != "regex" or kw["demo_column"] is not None,
        "demo_column",
        "check: regex needs demo_column: a column with one answer matching each row's pattern "
        "(what the oracle and the warm start answer)",
    )
    tokens = kw["max_new_tokens"]
    need(
        tokens is None or (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0),
        "max_new_tokens",
        "must be a positive integer, or left out to size it from the longest answer",
    )
    need(kw["on_bad_rows"] in BAD_ROWS, "on_bad_rows", f"must be one of {BAD_ROWS}")


def check_columns(opts: Options, columns: Sequence[str], path: str) -> None:
    """Raise ``ValueError`` naming every option whose column the file lacks, and the columns it has."""
    wanted = [
        ("prompt_column", opts.prompt_column),
        *(("prompt_template", f) for f in opts.template_fields),
        ("reference_column", opts.reference_column),
        ("id_column", opts.id_column),
        ("split_column", opts.split_column),
        ("demo_column", opts.demo_column),
        *(("hash_columns", c) for c in opts.hash_columns or ()),
    ]
    missing = [f"{option} {col!r}" for option, col in wanted if col is not None and col not in columns]
    if missing:
        raise ValueError(
            f"{path} has no column for {', '.join(missing)}; its columns are {list(columns)}: "
            "fix the env options (or the file's header) to name columns it has"
        )
