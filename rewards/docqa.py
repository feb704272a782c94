"""Rewards for internal-document QA with citations (``rltk_envs.doc_search_qa``).

What is rewarded: the answer's value AND its citation (:func:`doc_answer_cited`). The final turn must be one
``<answer>VALUE [D07]</answer>``: one value, then one doc id in brackets at the end. The value is compared
with the gold after normalizing case, whitespace, number formats (``$1,249.00`` = ``1249 USD``; a number may
leave out its unit but not change it) and date formats (``2023-03-04`` = ``March 4, 2023`` = ``4 Mar
2023``). The citation must be a doc that states that fact for the asked entity (``reference["support"]``):
for a two-hop question (the owner's team), the owner's own page, not the product page that links it.

Partial credit: a right value with a citation that does not support it earns ``wrong_citation_credit``,
**0 by default**. A citation is the point of the workflow (an answer nobody can check is not an answer), and
a right value under a wrong citation is often a lucky guess: team and role values repeat across the corpus,
so reading any person's page and citing it gets the team right about one time in twelve. Raise it (e.g. to
0.5) to shape a model that finds values but cannot yet cite; keep it below 1 so that citing still pays.

Every function parses with :func:`grade_completion`, which the env's verdict uses too (one parser for env
and reward). A parse failure (no answer tag, an empty answer, several values or citations, text after
the citation, an echo of the prompt, an unfinished turn) scores 0, the range minimum: never above a
well-formed wrong answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

from rltk.reward import reward_fn
from rltk.tools import FinalAnswer, parse_action

_ANSWER = re.compile(r"([^\[\]]*)\[\s*D\s*(\d{1,3})\s*\]\s*", re.IGNORECASE)  # linear: no backtracking
_DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%B %d %Y", "%b %d %Y", "%d %B %Y", "%d %b %Y", "%m/%d/%Y")
_NUMBER = re.compile(r"(?:usd ?|\$ ?)?(\d+(?:\.\d+)?)(?: ?(?:usd|dollars?)\b)?(.*)")


def canon(value: str) -> tuple[str, str, str]:
    """(kind, value, unit): a value with case, whitespace, number and date formats normalized.

    >>> canon("March 4, 2023") == canon("2023-03-04") == canon("4 Mar 2023")
    True
    >>> canon("$1,249.00"), canon("12 Weeks")
    (('num', '1249', ''), ('num', '12', 'week'))
    """
    s = re.sub(r"\s*\(D\d+\)$", "", str(value).strip().strip("\"'`*").strip()).rstrip(".").strip().lower()
    s = " ".join(re.sub(r"(?<=\d),(?=\d{3}\b)", "", s).replace(",", " ").split())
    for fmt in _DATE_FORMATS if re.fullmatch(r"[a-z0-9/ -]*\d{4}[a-z0-9/ -]*", s) else ():
        try:
            return "date", datetime.strptime(s, fmt).date().isoformat(), ""
        except ValueError:
            pass
    m = _NUMBER.fullmatch(s)
    if m:
        unit = " ".join(w[:-1] if w.endswith("s") and len(w) > 3 else w for w in m.group(2).split())
        return "num", f"{Decimal(m.group(1)).normalize():f}", unit
    return "text", s.strip(" !\"'"), ""


def same_value(answer: str, gold: str) -> bool:
    """Whether ``answer`` is ``gold`` up to format; a number may leave out its unit, not change it."""
    a, g = canon(answer), canon(gold)
    return a[:2] == g[:2] and bool(a[1]) and a[2] in (g[2], "")


class Graded(NamedTuple):
    """A judged answer: ``parsed`` (the grammar held), ``value_ok``, ``cite_ok`` (cited doc supports it)."""

    parsed: bool
    value_ok: bool
    cite_ok: bool
    cited: str | None


def grade(text: str, reference: dict[str, Any]) -> Graded:
    """Judge the text inside ``<answer>``: exactly ``VALUE [Dnn]``, one value and one citation at the end.

    >>> ref = {"answer": "$1,249", "support": ["D07"]}
    >>> grade("1249 USD [d7]", ref)
    Graded(parsed=True, value_ok=True, cite_ok=True, cited='D07')
    >>> grade("$1,249 [D07] [D08]", ref).parsed, grade("$1,249 or $1,299 [D07]", ref).value_ok
    (False, False)
    """
    m = _ANSWER.fullmatch(text) if isinstance(text, str) else None
    if not m or not m.group(1).strip():
        return Graded(False, False, False, None)
    cited = f"D{int(m.group(2)):02d}"
    return Graded(True, same_value(m.group(1), reference["answer"]), cited in reference["support"], cited)


def grade_completion(completion: str, reference: dict[str, Any]) -> Graded:
    """Judge a final assistant turn: it must be one ``<answer>...</answer>`` (text before it is allowed)."""
    action = parse_action(completion)
    return (
        grade(action.text, reference)
        if isinstance(action, FinalAnswer)
        else Graded(False, False, False, None)
    )


@reward_fn(range=(0.0, 1.0))
def doc_answer_cited(
    completion: str,
    reference: Mapping[str, Any],
    outcome: Mapping[str, Any],
    wrong_citation_credit: float = 0.0,
) -> float:
    """1 if the value is right and the cited doc supports it; ``wrong_citation_credit`` if only the value is.

    Args:
        completion: The final assistant turn (``<answer>VALUE [Dnn]</answer>``).
        reference: ``{"answer": gold value as the doc writes it, "support": [doc ids stating it], ...}``.
        outcome: The env's verdict. The completion is parsed here, the same way; an episode the env saw end
            without an answer (``answered`` False: with native tool calling, a last turn that also holds a
            ``<tool_call>``) scores 0.
        wrong_citation_credit: Score in ``[0, 1]`` of a right value under a citation that does not support it.

    Returns:
        1.0, ``wrong_citation_credit`` or 0.0 (wrong value, or a parse failure).

    >>> ref = {"answer": "March 4, 2023", "support": ["D07"]}
    >>> doc_answer_cited("<answer>2023-03-04 [D07]</answer>", ref, {})
    1.0
    >>> doc_answer_cited("<answer>2023-03-04 [D09]</answer>", ref, {}, wrong_citation_credit=0.5)
    0.5
    >>> doc_answer_cited("<answer>2023-03-04 or 2023-03-05 [D07]</answer>", ref, {})
    0.0
    >>> doc_answer_cited("<answer>2023-03-04 [D07] [D08]</answer>", ref, {}, wrong_citation_credit=0.5)
    0.0

    """
    if not 0.0 <= wrong_citation_credit <= 1.0:
        raise ValueError(f"wrong_citation_credit must be in [0, 1], got {wrong_citation_credit!r}")
    graded = grade_completion(completion, dict(reference))
    if not graded.value_ok or outcome.get("answered") is False:
        return 0.0
    return 1.0 if graded.cite_ok else float(wrong_citation_credit)
