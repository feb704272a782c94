"""SQL analytics: answer a business question about a small SQLite database with one SELECT query.

Workflow: an analyst gets the schema of a database (three tables of one family: a shop, an HR department or a
logistics network) and a question in English (a filtered count, a sum or average, a GROUP BY, a top-k with
ORDER BY, a join of two or three tables). They may explore the data with ``<tool>run_sql: SELECT ...</tool>``
(several calls; each returns the rows as compact text, capped) and then answer with one query in
``<answer>SELECT ...</answer>``, which the env runs. Rewarded (``correct`` in :mod:`rltk_rewards.outcome`,
from the env's verdict): the answer's result rows equal the gold query's rows, as multisets (column order
free), and in order where the question asks for an order; numbers are compared rounded to 2 decimals.

Every task generates its own database from its seed; every episode gets its own copy, built in memory in a
separate worker process (:mod:`rltk_envs.sqlite_sandbox`), so state is never shared. Model queries run there
read-only, with an authorizer (SELECT, reads and a short list of functions: no ATTACH, PRAGMA, write or DDL),
a VM-step, wall-time and memory budget, and caps on SQL length, value size, rows and characters; every
failure comes back as an ``<error>`` observation.
Questions come from templates in ``data/sql_analytics.json``: ``difficulty`` ``"easy"`` (one table, a filter,
one aggregate), ``"medium"`` (GROUP BY, HAVING, top-k, ordering), ``"hard"`` (joins) or ``"mixed"`` (all
three, stratified). Gold results are never empty, never a bare 0, tie-free at a top-k boundary, and never the
rows of a UNION of table counts.
Option ``tool_calling``: ``"text"`` (the :mod:`rltk.tools` text protocol, as above) or ``"native"`` (the chat
template's tool calling: ``run_sql`` is a JSON schema that travels with the task).

Teacher (:mod:`rltk_envs.sql_teacher`): the analytics team's template chain and legacy query builder. It
gets wrong the logistics schema (not covered: a fallback row count) and, elsewhere, averages (rounded to
whole units), maxima and top-k lists (sorted ascending) and HAVING filters (dropped): ``Task.info`` slices
``family`` and ``shape``. Accuracy on 200 eval tasks (seed 0): 0.565 at ``difficulty: easy`` (the recipe;
oracle 1.0, best trivial 0.015), 0.495 at ``mixed`` (oracle 1.0, best trivial 0.015); all errors in those
slices. Best-of-N votes on the final answer query, normalized (:meth:`SqlAnalyticsEnv.final_answer`).
"""

from __future__ import annotations

import random
import re
from functools import cache
from typing import Any, ClassVar

from rltk_envs import data
from rltk_envs.sqlite_sandbox import SHOW_ROWS, Database, SqlError, bare_sql, same_result, show

from rltk.env import SPLITS, Message, Policy, Task, Teacher, check_choice, draw_task, prompt_hash, split_of
from rltk.tools import FinalAnswer, ToolEnv, ToolEpisode, protocol_prompt

LEVELS = ("easy", "medium", "hard")
DIFFICULTIES = (*LEVELS, "mixed")
ANSWER_ROWS = 50
_INT, _TEXT = r"\d+", r".+?"


def _data() -> dict[str, Any]:
    return data("sql_analytics")


def _rows(family: str, db_seed: int) -> dict[str, list[tuple]]:
    """The tables' rows, drawn from ``db_seed`` (table sizes come from disjoint ranges, so they differ)."""
    rng, vocab, out = random.Random(db_seed), _data()["vocab"], {}
    for table in _data()["families"][family]["tables"]:
        n = rng.randint(*table["rows"])
        cols = []
        for _, spec in table["columns"]:
            if spec == "id":
                cols.append(list(range(1, n + 1)))
            elif "unique" in spec:
                cols.append(rng.sample(vocab[spec["unique"]], n))
            elif "pick" in spec:
                pool = rng.sample(vocab[spec["pick"]], spec["k"])
                cols.append([rng.choice(pool) for _ in range(n)])
            elif "ref" in spec:
                cols.append([rng.randint(1, len(out[spec["ref"]])) for _ in range(n)])
            else:
                lo, hi, *step = spec["int"]
                cols.append([rng.randrange(lo, hi + 1, *step) for _ in range(n)])
        out[table["name"]] = list(zip(*cols, strict=True))
    return out


def connect(family: str, db_seed: int, rows: dict[str, list[tuple]] | None = None) -> Database:
    """The task's database: a sandboxed read-only copy of its own (built on the first query)."""
    tables = {
        t["name"]: [c + (" INTEGER PRIMARY KEY" if spec == "id" else "") for c, spec in t["columns"]]
        for t in _data()["families"][family]["tables"]
    }
    return Database(tables, rows or _rows(family, db_seed))


def system_prompt(tool_calling: str = "text") -> str:
    """The system message: the task, the tool protocol (natively, the template lists the tool), answers."""
    return _data()["system"].format(protocol=protocol_prompt(_data()["tools"], tool_calling))


def schema(family: str) -> str:
    """The family's tables as ``name(col, ...)`` lines, as the prompt shows them."""
    tables = _data()["families"][family]["tables"]
    return "\n".join(f"{t['name']}({', '.join(c for c, _ in t['columns'])})" for t in tables)


@cache
def _patterns() -> dict[str, list[tuple[re.Pattern[str], dict[str, Any]]]]:
    """Per family schema text: (question regex, template) for every phrasing of every template."""
    out: dict[str, list[tuple[re.Pattern[str], dict[str, Any]]]] = {}
    for family, spec in _data()["families"].items():
        for tpl in spec["templates"]:
            for phrasing in tpl["q"]:
                parts = re.split(r"\{(\w+)\}", phrasing)
                body = "".join(
                    re.escape(p) if j % 2 == 0 else f"(?P<{p}>{_INT if 'int' in tpl['params'][p] else _TEXT})"
                    for j, p in enumerate(parts)
                )
                out.setdefault(schema(family), []).append((re.compile(body), tpl))
    return out


def shape(sql: str) -> str:
    """A template's question shape, read from its SQL: ``Task.info["shape"]``, a slice for reports.

    >>> shape("SELECT name FROM products WHERE price < 9 ORDER BY price DESC LIMIT 3")
    'top_k'
    """
    cues = (("avg", "AVG("), ("having", " HAVING "), ("top_k", " DESC"), ("sorted", " ORDER BY "))
    cues += (("max", "MAX("), ("min", "MIN("), ("group", " GROUP BY "), ("sum", "SUM("))
    return next((name for name, cue in cues if cue in sql), "count")


def read_prompt(messages: list[Message]) -> tuple[str, str]:
    """(schema text, question) from the prompt's user turn."""
    m = re.fullmatch(r"Tables:\n(.+)\n\nQuestion: (.+)", messages[1]["content"], re.DOTALL)
    if not m:
        raise ValueError("prompt is not a sql_analytics task")
    return m.group(1), m.group(2)


def question_sql(messages: list[Message]) -> str:
    """The SQL a question asks for, by matching the question text against the template phrasings."""
    tables, question = read_prompt(messages)
    for pattern, tpl in _patterns().get(tables, []):
        if m := pattern.fullmatch(question):
            return tpl["sql"].format(**m.groupdict())
    raise ValueError(f"no template matches {question!r}")


class SqlAnalyticsEnv(ToolEnv):
    """Answer a business question about a seeded SQLite database with one SELECT query (tools: ``run_sql``).

    Args:
        difficulty: ``"easy"``, ``"medium"``, ``"hard"`` or ``"mixed"`` (all levels, stratified).
        tool_calling: ``"text"`` (the plain-text tool protocol) or ``"native"`` (the chat template's).

    """

    name = "sql_analytics"
    description = (
        "Answer business questions about a small SQLite database with SQL (run_sql tool, 3 schemas)."
    )
    max_new_tokens = 96  # the longest gold query (a 3-table join) is about 75 tokens
    max_turns = 4
    default_rewards: ClassVar[dict[str, float]] = {"correct": 1.0}

    def __init__(self, difficulty: str = "mixed", tool_calling: str = "text", **options: Any) -> None:
        super().__init__(_data()["tools"], tool_calling, **options)
        check_choice("difficulty", difficulty, DIFFICULTIES)
        self.difficulty = difficulty
        families = _data()["families"]
        self.pool = [
            (f, j)
            for f in families
            for j, t in enumerate(families[f]["templates"])
            if difficulty in ("mixed", t["level"])
        ]

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split``, stratified over (family, template); prefix-stable, disjoint by hash."""
        check_choice("split", split, SPLITS)
        out: list[Task] = []
        seen: set[str] = set()
        for i in range(n):
            block = random.Random(f"{seed}:{split}:block:{i // len(self.pool)}").sample(
                self.pool, len(self.pool)
            )

            def draw(attempt: int, i: int = i, block: list = block) -> Task | None:
                rng = random.Random(f"{seed}:{split}:{i}:{attempt}")
                family, j = block[i % len(self.pool)] if attempt < 1000 else rng.choice(self.pool)
                return self._draw(rng, family, j, f"{self.name}/{split}/{seed}/{i}", split)

            out.append(draw_task(split, seen, draw, 20_000))
        return out

    def _draw(self, rng: random.Random, family: str, j: int, task_id: str, split: str) -> Task | None:
        """One candidate task, or None if it lies in another split or its gold result is degenerate."""
        tpl, db_seed = _data()["families"][family]["templates"][j], rng.randrange(2**31)
        rows, params = _rows(family, db_seed), {}
        names = {t["name"]: [c for c, _ in t["columns"]] for t in _data()["families"][family]["tables"]}
        for key, spec in tpl["params"].items():
            if "col" in spec:
                table, col = spec["col"].split(".")
                params[key] = rng.choice(rows[table])[names[table].index(col)]
            else:
                lo, hi, *step = spec["int"]
                params[key] = rng.randrange(lo, hi + 1, *step)
        question = rng.choice(tpl["q"]).format(**params)
        user = f"Tables:\n{schema(family)}\n\nQuestion: {question}"
        system = system_prompt(self.protocol.tool_calling)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        if split_of(messages) != split:
            return None
        sql, distinct = tpl["sql"].format(**params), tpl.get("distinct", "SELECT 1").format(**params)
        with connect(family, db_seed, rows) as db:
            gold, keys = db.run(sql, ANSWER_ROWS)[1], [r[0] for r in db.run(distinct, 10)[1]]
        counts = [(len(r),) for r in rows.values()]
        if (
            not 0 < len(gold) <= 20
            or any(v is None for r in gold for v in r)
            or gold == [(0,)]
            or ("k" in params and len(gold) != params["k"])
            or len(set(keys)) != len(keys)
            or same_result(gold, counts, ordered=False)
        ):
            return None
        info = {"difficulty": tpl["level"], "family": family, "template": f"{family}/{j}"}
        info["shape"] = shape(tpl["sql"])
        reference = {"family": family, "db_seed": db_seed, "sql": sql, "gold": [list(r) for r in gold]}
        reference["ordered"] = tpl["ordered"]
        return Task(task_id, split, messages, reference, info, tools=self.protocol.schemas)

    def episode(self, task: Task) -> ToolEpisode:
        """A tool episode on this rollout's own freshly built database."""
        db = connect(task.reference["family"], task.reference["db_seed"])

        def run_sql(query: str) -> str:
            try:
                return show(*db.run(query, SHOW_ROWS))
            except SqlError as exc:
                raise ValueError(str(exc)) from None  # ToolEpisode answers "<error>run_sql failed: ...>"

        def judge(text: str) -> dict[str, Any]:
            with db:  # the answer ends the episode: free its database in the worker now
                return self._judge(task, db, text)

        return ToolEpisode(task, {"run_sql": run_sql}, judge, 1000)

    def _judge(self, task: Task, db: Database, query: str) -> dict[str, Any]:
        try:
            rows = db.run(query, ANSWER_ROWS)[1]
        except SqlError as exc:
            return {"correct": False, "error": str(exc)}
        ok = len(rows) <= ANSWER_ROWS and same_result(rows, task.reference["gold"], task.reference["ordered"])
        return {"correct": ok, "error": None, "rows": len(rows)}

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        """Judge one final turn (``<answer>SELECT ...</answer>``) on a fresh database."""
        action = self.protocol.parse(completion)
        if not isinstance(action, FinalAnswer):
            return {"correct": False, "error": "no <answer>...</answer>"}
        with connect(task.reference["family"], task.reference["db_seed"]) as db:
            return self._judge(task, db, action.text)

    def oracle(self, messages: list[Message]) -> str:
        """Map the question to its SQL by template; on half the prompts, preview it with ``run_sql`` first.

        Which half is fixed by a hash of the question, so warm-start demonstrations show both first turns.
        """
        sql = question_sql(messages)
        observed = any(m["role"] != "assistant" for m in messages[2:])  # the env answered a call
        if not observed and int(prompt_hash(messages[:2])[:2], 16) % 2 == 0:
            return self.protocol.call("run_sql", sql)
        return f"<answer>{sql}</answer>"

    def teacher(self) -> Teacher:
        """The analytics team's template chain (:class:`rltk_envs.sql_teacher.SqlTemplateTeacher`)."""
        from rltk_envs.sql_teacher import SqlTemplateTeacher

        return SqlTemplateTeacher(self.protocol.tool_calling)

    def final_answer(self, messages: list[Message], actions: list[str]) -> str | None:
        """The last turn's answer query, normalized, as the best-of-N vote key.

        Normalized: code fence and trailing semicolons dropped, then its tokens (string literals kept as
        written, other tokens lowercased) joined by single spaces. None when the last turn is no ``<answer>``
        or its text is not one SELECT (or WITH) statement. Whether the query runs is not checked: that needs
        the task's database, which only its reference names.
        """
        if not actions or not isinstance(action := self.protocol.parse(actions[-1]), FinalAnswer):
            return None
        sql = bare_sql(action.text)
        tokens = re.findall(r"'(?:[^']|'')*'?|\w+(?:\.\w+)*|<=|>=|<>|!=|==|\|\||\S", sql)
        tokens = [t if t.startswith("'") else t.lower() for t in tokens]
        if not tokens or tokens[0] not in ("select", "with") or ";" in tokens:
            return None
        return " ".join(tokens)

    def baselines(self) -> dict[str, Policy]:
        """A constant answer, the first table's row count, and an echo of the question."""
        return {
            "constant_zero": lambda m: "<answer>SELECT 0</answer>",
            "count_first_table": lambda m: (
                f"<answer>SELECT COUNT(*) FROM {read_prompt(m)[0].split('(')[0]}</answer>"
            ),
            "echo_question": lambda m: f"<answer>{read_prompt(m)[1]}</answer>",
        }
