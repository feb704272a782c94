"""Your data, no Python: an env over labelled examples in a file (JSONL, CSV, Parquet or a saved HF dataset).

Workflow: whatever the file's rows are examples of (route a ticket, grade an answer, extract fields). The
prompt is one column or a template over columns (plus a system message); the reference is one column;
the check is ``exact``, ``choice``, ``numeric``, ``json_f1``, ``regex`` or a named ``reward``
(:mod:`rltk_envs.dataset_checks`). Rows that cannot be used are reported by row number in one warning and
left out (:mod:`rltk_envs.dataset_rows`); ``docs/dataset.md`` is the user's guide.

Splits: a split column, or ratios over the hash of an id column or of the normalised input columns, never
of the rendered prompt or the row index, so appending rows or editing the template moves no row.

Oracle: the reference, looked up by the rendered prompt (what the model sees), written as the answer the
check accepts (the ``demo_column`` text where one is given); the warm start trains on it, so demonstrations
come from the reference column. Teacher: none (a data file carries no scripted workflow to imitate).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import statistics
from collections import Counter, defaultdict
from typing import Any, ClassVar

from rltk_envs.dataset_checks import (
    answer_key,
    call_reward,
    canonical_value,
    compose_object,
    field_f1,
    format_number,
    parse_number,
    parse_object,
    regex_match,
    restrict,
    vote_text,
)
from rltk_envs.dataset_load import load_table
from rltk_envs.dataset_options import Options, check_columns, validate
from rltk_envs.dataset_rows import BadRow, Record, bad_row_report, build_record, choice_labels, system_message

from rltk.env import SPLITS, Env, FinalAnswer, Message, Policy, Task, check_choice
from rltk.plugins import PluginError, get_reward

log = logging.getLogger("rltk")

MAX_CONSTANT_BASELINES = 10  # one constant-answer baseline per label up to this many labels
SCORE_REWARD = "rltk_envs.dataset_checks:dataset_score"  # json_f1's graded reward (field F1)


def prompt_key(messages: list[Message]) -> str:
    """The lookup key of a prompt: its system and user turns as canonical JSON."""
    turns = [
        {"role": m.get("role"), "content": m.get("content")} for m in messages if m.get("role") != "assistant"
    ]
    return json.dumps(turns, sort_keys=True, ensure_ascii=False)


class DatasetEnv(Env):
    """Labelled examples from a file: prompt from columns, reference from a column, one check per row.

    Args:
        path: The data file (``.csv``/``.tsv``, ``.jsonl``/``.json``, ``.parquet``) or a ``save_to_disk``
            directory; relative to the working directory.
        format: ``csv``, ``json``, ``parquet`` or ``disk``, where the suffix does not tell.
        source_split: The split of a saved ``DatasetDict`` to read (needed when it has several).
        prompt_column: The column that is the user prompt (or give ``prompt_template``).
        prompt_template: The user prompt as a template over columns, ``"Q: {question}"``.
        system: A system message before every prompt.
        reference_column: The column holding the reference answer.
        id_column: A column of unique row ids: splits hash it (best when inputs repeat or get edited).
        split_column: A column of ``train``/``eval``/``test`` (``validation``, ``valid``, ``val``, ``dev``
            mean eval) instead of ratios.
        split_ratios: ``[train, eval, test]`` weights of the hashed split (default ``[0.8, 0.1, 0.1]``).
        hash_columns: The columns a row's key hashes when there is no ``id_column`` (default: every column
            but the reference, split and demonstration ones).
        check: ``exact`` (default), ``choice``, ``numeric``, ``json_f1``, ``regex`` or ``reward``.
        labels: The label set of ``choice`` (default: every distinct reference in the file).
        label_hint: For ``choice``, append "Answer with one of: ..." to the system message.
        case_sensitive: Compare ``exact``/``choice`` answers with case (default: case folded).
        tolerance: ``numeric``: absolute tolerance.
        rel_tolerance: ``numeric``: relative tolerance (of the reference); the larger of the two applies.
        json_fields: ``json_f1``: the fields scored (default: every field of each reference object).
        f1_threshold: ``json_f1``: field F1 at which an answer counts as correct (default 1.0: every field).
        reward: ``reward``: a registered reward (``rltk rewards list``) or ``pkg.module:function``.
        reward_params: ``reward``: its keyword params.
        reward_threshold: ``reward``: score at which an answer counts as correct (default: the top of the
            reward's declared range, else 1.0).
        demo_column: A column holding the answer to demonstrate (and the oracle's) instead of the reference;
            required by ``regex``. Each row's must pass its own check.
        max_new_tokens: Tokens per answer (default: sized from the longest answer, see ``docs/dataset.md``).
        on_bad_rows: ``skip`` (default: leave them out, one warning naming them) or ``error`` (raise).

    """

    name = "dataset"
    description = "Your labelled examples in a file (CSV, JSONL, Parquet, saved HF dataset), no Python."
    default_rewards: ClassVar[dict[str, float]] = {"correct": 1.0}
    splits_by_prompt_hash: ClassVar[bool] = False  # rows split by their key, whatever the template renders

    def __init__(
        self,
        path: str | None = None,
        format: str | None = None,
        source_split: str | None = None,
        prompt_column: str | None = None,
        prompt_template: str | None = None,
        system: str | None = None,
        reference_column: str | None = None,
        id_column: str | None = None,
        split_column: str | None = None,
        split_ratios: list[float] | None = None,
        hash_columns: list[str] | None = None,
        check: str = "exact",
        labels: list[str] | None = None,
        label_hint: bool = True,
        case_sensitive: bool = False,
        tolerance: float = 1e-6,
        rel_tolerance: float = 0.0,
        json_fields: list[str] | None = None,
        f1_threshold: float = 1.0,
        reward: str | None = None,
        reward_params: dict[str, Any] | None = None,
        reward_threshold: float | None = None,
        demo_column: str | None = None,
        max_new_tokens: int | None = None,
        on_bad_rows: str = "skip",
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.opts: Options = validate(
            path=path, format=format, source_split=source_split, prompt_column=prompt_column,
            prompt_template=prompt_template, system=system, reference_column=reference_column,
            id_column=id_column, split_column=split_column, split_ratios=split_ratios,
            hash_columns=hash_columns, check=check, labels=labels, label_hint=label_hint,
            case_sensitive=case_sensitive, tolerance=tolerance, rel_tolerance=rel_tolerance,
            json_fields=json_fields, f1_threshold=f1_threshold, reward=reward,
            reward_params={} if reward_params is None else reward_params, reward_threshold=reward_threshold,
            demo_column=demo_column, max_new_tokens=max_new_tokens, on_bad_rows=on_bad_rows,
        )  # fmt: skip
        self._reward_fn, self._reward_threshold = self._resolve_reward()
        table = load_table(self.opts.path, self.opts.format, self.opts.source_split)
        check_columns(self.opts, table.columns, table.path)
        self.labels = choice_labels(self.opts, table) if self.opts.check == "choice" else {}
        system = system_message(self.opts, self.labels)
        built = [
            build_record(self.opts, table, i, system, self.labels, self._demo_ok)
            for i in range(len(table.rows))
        ]
        self.records: list[Record] = [r for r in built if isinstance(r, Record)]
        self.bad_rows: list[BadRow] = [r for r in built if isinstance(r, BadRow)]
        self._report_bad_rows(table, len(built))
        self._index()
        self._warn_duplicates(table)
        self.max_new_tokens = self.opts.max_new_tokens or self._answer_tokens()
        if self.opts.check == "reward":
            self.default_rewards = {str(self.opts.reward): 1.0}
            self.default_reward_params = {str(self.opts.reward): dict(self.opts.reward_params)}
        elif self.opts.check == "json_f1":
            self.default_rewards = {SCORE_REWARD: 1.0}  # partial credit: field F1, as invoice_extraction

    def _resolve_reward(self) -> tuple[Any, float]:
        """The named reward and its threshold (``reward`` check only)."""
        if self.opts.check != "reward":
            return None, 1.0
        try:
            fn = get_reward(str(self.opts.reward))
        except PluginError as exc:
            raise ValueError(f"env 'dataset' options: reward={self.opts.reward!r}: {exc}") from exc
        declared = getattr(fn, "reward_range", None)
        top = float(declared[1]) if declared else 1.0
        return fn, float(self.opts.reward_threshold) if self.opts.reward_threshold is not None else top

    def _report_bad_rows(self, table: Any, total: int) -> None:
        """Name every bad row in one message: a warning (``skip``), or the error (``error``, none left)."""
        if not self.bad_rows:
            return
        message = bad_row_report(table, self.bad_rows, total)
        if not self.records:
            raise ValueError(
                f"{message}\nno usable row is left: check the column options against the file's columns "
                f"{list(table.columns)} and the check kind ({self.opts.check!r})"
            )
        if self.opts.on_bad_rows == "error":
            raise ValueError(
                f"{message}\nfix these rows, or set env.options.on_bad_rows=skip to leave them out"
            )
        log.warning("%s", message)

    def _index(self) -> None:
        """Task ids, rows per split, and the oracle's prompt → answer table."""
        seen: Counter[str] = Counter()
        self.ids: list[str] = []
        self.by_split: dict[str, list[int]] = {s: [] for s in SPLITS}
        self.answers: dict[str, str] = {}
        for i, rec in enumerate(self.records):
            seen[rec.key] += 1  # identical inputs share a key: a suffix keeps ids unique (by file order)
            k = seen[rec.key]
            self.ids.append(f"{self.name}/{rec.key[:16]}" + (f"-{k}" if k > 1 else ""))
            self.by_split[rec.split].append(i)
            self.answers.setdefault(prompt_key(rec.messages), rec.answer)

    def _warn_duplicates(self, table: Any) -> None:
        """Warn about one prompt with several answers (the oracle gives the first) or in several splits."""
        groups: dict[str, list[Record]] = defaultdict(list)
        for rec in self.records:
            groups[prompt_key(rec.messages)].append(rec)
        conflicts = [g for g in groups.values() if len({r.label for r in g}) > 1]
        leaks = [g for g in groups.values() if len({r.split for r in g}) > 1]
        advice = {
            "different references": "the oracle answers the first; make the prompt tell them apart",
            "different splits": "an eval prompt is also trained on; hash by the columns the prompt reads "
            "(hash_columns) or make the prompts distinct",
        }
        for what, found in (("different references", conflicts), ("different splits", leaks)):
            if found:
                shown = "; ".join(", ".join(table.where(r.row) for r in g) for g in found[:10])
                more = f" and {len(found) - 10} more" if len(found) > 10 else ""
                log.warning(
                    "dataset %s: %d prompts render identically for rows with %s (rows %s%s): %s",
                    table.path, len(found), what, shown, more, advice[what],
                )  # fmt: skip

    def _answer_tokens(self) -> int:
        """Tokens for the longest answer, estimated at 2 characters a token (generous) plus 8 spare."""
        longest = max((len(r.answer) for r in self.records), default=0)
        return max(8, math.ceil(longest / 2) + 8)

    def _demo_ok(self, record: Record, demo: str) -> bool:
        """Whether a row's demonstration passes its own check (a named reward is not called at load time)."""
        if self.opts.check == "reward":
            return True
        return bool(self._judge(record.value, demo)["correct"])

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split`` in a seeded order; prefix-stable.

        The order is a sort by the hash of (seed, task id): a row's place never depends on its position in
        the file. The train split repeats in epochs (each its own order) when ``n`` exceeds its rows, as
        a trainer iterates a dataset; eval and test never repeat a row: they return every row they have,
        with a warning, when asked for more.

        Raises:
            ValueError: If the split is unknown, or has no rows while ``n > 0`` (the fix is in the message).

        """
        check_choice("split", split, SPLITS)
        pool = self.by_split[split]
        if n <= 0:
            return []
        if not pool:
            counts = {s: len(v) for s, v in self.by_split.items()}
            raise ValueError(
                f"dataset split {split!r} has no rows (rows per split: {counts}); "
                "raise its share in env.options.split_ratios or add rows to it"
            )
        if split != "train" and n > len(pool):
            log.warning(
                "dataset split %r has %d rows; returning those %d, not %d", split, len(pool), len(pool), n
            )
        out: list[Task] = []
        epoch = 0
        while len(out) < n:
            order = sorted(pool, key=lambda i: _shuffle_key(seed, epoch, self.ids[i]))
            out += [self._task(i) for i in order[: n - len(out)]]
            if split != "train":
                break
            epoch += 1
        return out

    def _task(self, i: int) -> Task:
        rec = self.records[i]
        reference: dict[str, Any] = {
            "answer": rec.answer,
            "reference": rec.reference,
            "label": rec.label,
            "row": rec.row,
            "check": self.opts.check,
        }
        if self.opts.check in ("numeric", "json_f1"):
            reference["value"] = rec.value
        info: dict[str, Any] = {}
        if self.opts.check == "choice" or (self.opts.check == "exact" and len(self.labels_seen) <= 20):
            info["label"] = rec.label  # per-label accuracy (recall per class) in eval tables
        return Task(self.ids[i], rec.split, [dict(m) for m in rec.messages], reference, info)

    @property
    def labels_seen(self) -> set[str]:
        """Distinct answer classes of the references (cached)."""
        if not hasattr(self, "_labels_seen"):
            self._labels_seen = {r.label for r in self.records}
        return self._labels_seen

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        """The verdict: ``correct``, ``answer`` (the parsed answer class, None if unparseable), ``score``.

        Never raises on model output. The row's parsed reference is found by task id (the reference dict
        keeps only JSON-friendly values); an unknown task falls back to its reference text.
        """
        value = self._value_of(task)
        if self.opts.check == "reward":
            score = call_reward(self._reward_fn, completion, task.reference, self.opts.reward_params)
            ok = score is not None and score >= self._reward_threshold
            return {"correct": ok, "answer": vote_text(completion, self.opts.case_sensitive), "score": score}
        return self._judge(value, completion)

    def _value_of(self, task: Task) -> Any:
        index = self._id_index.get(task.id)
        if index is not None:
            return self.records[index].value
        ref = task.reference
        if self.opts.check == "regex":
            return re.compile(str(ref.get("label", "")))
        return ref.get("value", ref.get("label"))

    @property
    def _id_index(self) -> dict[str, int]:
        if not hasattr(self, "_ids_cached"):
            self._ids_cached = {task_id: i for i, task_id in enumerate(self.ids)}
        return self._ids_cached

    def _judge(self, value: Any, completion: Any) -> dict[str, Any]:
        """The check of ``completion`` against a parsed reference ``value`` (all kinds but ``reward``)."""
        kind, cs = self.opts.check, self.opts.case_sensitive
        if kind == "numeric":
            got = parse_number(completion) if isinstance(completion, str) else None
            ok = got is not None and abs(got - value) <= max(
                self.opts.tolerance, self.opts.rel_tolerance * abs(value)
            )
            answer = None if got is None else format_number(got)
            return {"correct": ok, "answer": answer, "score": float(ok)}
        if kind == "json_f1":
            obj = parse_object(completion) if isinstance(completion, str) else None
            if obj is None:
                return {"correct": False, "answer": None, "score": 0.0}
            obj = restrict(obj, self.opts.json_fields)
            f1 = field_f1(obj, value)
            return {"correct": f1 >= self.opts.f1_threshold, "answer": answer_key(obj), "score": f1}
        if kind == "regex":
            ok = regex_match(value, completion)
            return {"correct": ok, "answer": vote_text(completion, True), "score": float(ok)}
        answer = vote_text(completion, cs)
        if kind == "choice":
            label = self.labels.get(answer) if answer is not None else None
            ok = label is not None and label == value
            return {"correct": ok, "answer": label, "score": float(ok)}
        ok = answer is not None and answer == value
        return {"correct": ok, "answer": answer, "score": float(ok)}

    def oracle(self, messages: list[Message]) -> str:
        """The row's answer, looked up by the prompt the model sees ("" for a prompt not in the data)."""
        return self.answers.get(prompt_key(messages), "")

    def final_answer(self, messages: list[Message], actions: list[str]) -> FinalAnswer:
        """The answer class of the last turn, parsed without the reference (best-of-N's vote key)."""
        if not actions:
            return None
        kind, completion = self.opts.check, actions[-1]
        if kind in ("numeric", "json_f1", "choice"):
            probe = 0.0 if kind == "numeric" else {} if kind == "json_f1" else None
            return self._judge(probe, completion)["answer"]
        return vote_text(completion, self.opts.case_sensitive or kind == "regex")

    def baselines(self) -> dict[str, Policy]:
        """Trivial policies from the train split: ``most_frequent``; each label (at most 10); more per check.

        ``constant_<label>`` answers one label every time (the choice check, or an exact check with at
        most 10 distinct references); ``median`` (numeric) answers the train references' median;
        ``most_frequent_fields`` (json_f1) answers each field's most frequent train value.
        """
        train = [self.records[i] for i in self.by_split["train"]] or self.records
        counts = Counter(r.label for r in train)
        spelled = {r.label: r.answer for r in train}
        top = min(counts, key=lambda label: (-counts[label], label))
        out: dict[str, Policy] = {"most_frequent": _constant(spelled[top])}
        if self.opts.check == "choice" and len(self.labels) <= MAX_CONSTANT_BASELINES:
            out |= {f"constant_{_slug(lab)}": _constant(lab) for lab in self.labels.values()}
        elif self.opts.check == "exact" and len(self.labels_seen) <= MAX_CONSTANT_BASELINES:
            out |= {
                f"constant_{_slug(lab)}": _constant(spelled.get(lab, lab)) for lab in sorted(self.labels_seen)
            }
        elif self.opts.check == "numeric":
            out["median"] = _constant(format_number(statistics.median(float(r.value) for r in train)))
        elif self.opts.check == "json_f1":
            out["most_frequent_fields"] = _constant(compose_object(_field_modes(train)))
        return out


def _shuffle_key(seed: int, epoch: int, task_id: str) -> str:
    """A row's place in one epoch's order: a seeded hash of its id (never of its file position)."""
    return hashlib.sha256(f"{seed}:{epoch}:{task_id}".encode()).hexdigest()


def _constant(answer: str) -> Policy:
    return lambda _messages: answer


def _slug(label: str) -> str:
    """A label as part of a baseline name: spaces and punctuation to ``_``."""
    return re.sub(r"\W+", "_", label).strip("_") or "blank"


def _field_modes(records: list[Record]) -> dict[str, Any]:
    """Each field's most frequent value over the records' reference objects (ties: the first seen)."""
    values: dict[str, Counter[str]] = defaultdict(Counter)
    first: dict[tuple[str, str], Any] = {}
    for rec in records:
        for key, val in rec.value.items():
            canon = canonical_value(val)
            values[key][canon] += 1
            first.setdefault((key, canon), val)
    return {key: first[(key, counts.most_common(1)[0][0])] for key, counts in values.items()}
