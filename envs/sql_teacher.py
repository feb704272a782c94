"""The teacher of ``sql_analytics``: the analytics team's template chain with its legacy query builder."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from rltk_envs import data
from rltk_envs.sql_analytics import question_sql, read_prompt, schema

from rltk.env import Message, Teacher, prompt_hash
from rltk.tools import ToolProtocol

_COVERED = (schema("shop"), schema("hr"))  # the chain predates the logistics database
# The legacy query builder's three systematic rewrites of a template's SQL, in the order it applies them.
_ROUND_AVG = (re.compile(r"\bAVG\(([^()]*)\)"), r"ROUND(AVG(\1))")  # averages reported in whole units
_EXTREME = (re.compile(r"^SELECT (MAX|MIN)\(([\w.]+)\) FROM (.+)$"), r"SELECT \2 FROM \3 ORDER BY \2 LIMIT 1")
_ASCENDING = (re.compile(r" DESC\b"), "")  # its sort step only sorts ascending
_NO_HAVING = (re.compile(r" HAVING .*$"), "")  # its GROUP BY step has no HAVING filter
_REWRITES = (_ROUND_AVG, _EXTREME, _ASCENDING, _NO_HAVING)


class SqlTemplateTeacher(Teacher):
    """The analytics team's workflow: a question-template chain feeding a legacy query builder.

    It reads only the conversation. For the shop and HR schemas it matches the question against the template
    phrasings it knows (the env's table, which the oracle reads too), fills in the parameters and writes the
    query through the team's query builder, which has three known gaps: it wraps every ``AVG`` in ``ROUND``
    (averages in whole units), writes ``MAX``/``MIN`` as ``ORDER BY col LIMIT 1`` and sorts only ascending
    (so "highest", "heaviest", "most ... first" come out as the lowest), and drops ``HAVING`` filters. The
    chain predates the logistics database: a question on its schema (or one no template matches) gets the
    fallback ``SELECT COUNT(*)`` of the first table. Like the oracle it previews its query with ``run_sql``
    on half the prompts (the same hash rule), then answers, ignoring the preview. Every answer is one valid
    SELECT in ``<answer>...</answer>``.

    Slices it gets wrong, by prompt cue: ``Task.info["family"] == "logistics"`` (the schema's tables
    ``warehouses``, ``carriers``, ``shipments``) and ``Task.info["shape"]`` ``avg`` ("average"; right only
    where the average is a whole number), ``max`` ("highest", "top", "maximum"; right where one row passes
    the filter), ``top_k`` ("the k ... most/highest first") and ``having`` ("which ... have more than c",
    "total above t"; right where every group passes). All its other answers are right.

    Measured accuracy (200 tasks, seed 0), beside the oracle and the best trivial baseline; all of its
    errors fall in the slices above on each of these four runs:

    ================================  =====  =======  ======  ============
    options                           split  teacher  oracle  best trivial
    ================================  =====  =======  ======  ============
    ``difficulty: easy`` (recipe)     eval   0.565    1.0     0.015
    ``difficulty: easy`` (recipe)     test   0.585    1.0     0.065
    ``difficulty: mixed`` (default)   eval   0.495    1.0     0.015
    ``difficulty: mixed`` (default)   test   0.465    1.0     0.0
    ================================  =====  =======  ======  ============

    Args:
        tool_calling: The env's ``tool_calling`` option (how a ``run_sql`` preview is written).

    """

    weak_slices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "family": ("logistics",),
        "shape": ("avg", "max", "top_k", "having"),
    }

    def __init__(self, tool_calling: str = "text") -> None:
        self.protocol = ToolProtocol(data("sql_analytics")["tools"], tool_calling)

    def query(self, messages: list[Message]) -> str:
        """The query the chain writes for the prompt's question (a valid SELECT; never raises)."""
        try:
            tables = read_prompt(messages)[0]
        except Exception:  # not a sql_analytics prompt
            return "SELECT 0"
        try:
            sql = question_sql(messages) if tables in _COVERED else None
        except Exception:  # a question no template matches
            sql = None
        if sql is None:  # the chain's fallback: the first table's row count
            return f"SELECT COUNT(*) FROM {tables.split('(')[0]}"
        for pattern, replacement in _REWRITES:
            sql = pattern.sub(replacement, sql)
        return sql

    def __call__(self, messages: list[Message]) -> str:
        """Preview the query with ``run_sql`` on half the prompts (before any observation), else answer it."""
        sql = self.query(messages)
        try:
            observed = any(m["role"] != "assistant" for m in messages[2:])  # the env answered a call
            preview = not observed and int(prompt_hash(messages[:2])[:2], 16) % 2 == 0
        except Exception:  # not a conversation the chain can read: answer at once
            preview = False
        return self.protocol.call("run_sql", sql) if preview else f"<answer>{sql}</answer>"
