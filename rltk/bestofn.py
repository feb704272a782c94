"""Best-of-N without the answer key: how a workflow that samples N times picks its one answer.

The orchestrated alternative to a trained model is often "sample the base model N times and pick". The pick
must be deployable, so it never sees the reference: it is a majority vote over the env's own parse of each
sample's final answer (:meth:`rltk.env.Env.final_answer`), per field for structured answers (an invoice's
JSON). Samples whose answer does not parse, or fails the env's reference-free check, abstain. Ties go to the
answer whose best sample has the higher mean log-prob (the sampler's own, per generated token). pass@N, which
does use the key, is reported apart as an upper bound.

    N samples ──env.final_answer──▶ Candidate(answer, mean_logp) ──select──▶ Pick(index | per-field answer)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from rltk.env import FinalAnswer


@dataclass(frozen=True)
class Candidate:
    """One sample as the selector sees it: its parsed final answer and its confidence.

    Attributes:
        answer: :meth:`Env.final_answer` of the sample (None: it abstains).
        mean_logp: Mean sampling log-prob of its generated tokens (tie-break).

    """

    answer: FinalAnswer
    mean_logp: float


@dataclass(frozen=True)
class Pick:
    """The selector's choice.

    Attributes:
        index: The chosen sample, or None when the answer is composed from per-field votes (single-turn
            structured answers: no one sample need hold every winning field).
        answer: The chosen answer (a per-field dict when composed).
        abstained: How many samples abstained.

    """

    index: int | None
    answer: FinalAnswer
    abstained: int


def _winner(values: Sequence[tuple[Hashable, float]]) -> Hashable:
    """The most common value; ties go to the value whose best sample has the higher mean log-prob.

    >>> _winner([("a", -1.0), ("b", -0.5), ("a", -2.0), ("b", -3.0)])
    'b'
    >>> _winner([("a", -1.0), ("b", -0.5), ("a", -2.0)])
    'a'
    """
    counts = Counter(v for v, _ in values)
    best: dict[Hashable, float] = {}
    for value, logp in values:
        best[value] = max(best.get(value, float("-inf")), logp)
    order = {v: i for i, (v, _) in reversed(list(enumerate(values)))}  # first seen wins an exact tie
    return max(counts, key=lambda v: (counts[v], best[v], -order[v]))


def _best_sample(indices: Sequence[int], candidates: Sequence[Candidate]) -> int:
    return max(indices, key=lambda i: (candidates[i].mean_logp, -i))


def select(candidates: Sequence[Candidate], compose: bool = False) -> Pick:
    """Pick one answer from N samples by majority vote, never reading a reference.

    Args:
        candidates: The N samples' parsed answers and mean log-probs.
        compose: For per-field (dict) answers, return the per-field majority as a new answer
            (``index=None``; single-turn envs compose it with :meth:`Env.compose_answer`) instead of the
            sample that agrees with the most field winners (multi-turn envs, whose episodes acted on state).

    Returns:
        The pick. When every sample abstains: the sample with the highest mean log-prob.

    >>> c = [Candidate("FLAG", -0.2), Candidate(None, -0.1), Candidate("CLEAR", -0.9)]
    >>> select([*c, Candidate("FLAG", -0.3)])
    Pick(index=0, answer='FLAG', abstained=1)
    >>> d = [Candidate({"a": 1, "b": 2}, -1.0), Candidate({"a": 1, "b": 3}, -2.0)]
    >>> d.append(Candidate({"a": 0, "b": 3}, -3.0))
    >>> select(d, compose=True)
    Pick(index=None, answer={'a': 1, 'b': 3}, abstained=0)
    >>> select(d).index
    1

    """
    voters = [i for i, c in enumerate(candidates) if c.answer is not None]
    abstained = len(candidates) - len(voters)
    if not voters:
        index = _best_sample(range(len(candidates)), candidates)
        return Pick(index, None, abstained)
    if not isinstance(candidates[voters[0]].answer, dict):
        answer = _winner([(candidates[i].answer, candidates[i].mean_logp) for i in voters])
        chosen = _best_sample([i for i in voters if candidates[i].answer == answer], candidates)
        return Pick(chosen, answer, abstained)
    dicts: list[tuple[int, dict[str, Any]]] = [
        (i, a) for i in voters if isinstance(a := candidates[i].answer, dict)
    ]
    fields = sorted({k for _, a in dicts for k in a})
    voted = {f: _winner([(a[f], candidates[i].mean_logp) for i, a in dicts if f in a]) for f in fields}
    if compose:
        return Pick(None, voted, abstained)
    agree = {i: sum(a.get(f, _MISSING) == v for f, v in voted.items()) for i, a in dicts}
    top = max(agree.values())
    chosen = _best_sample([i for i, n in agree.items() if n == top], candidates)
    return Pick(chosen, candidates[chosen].answer, abstained)


_MISSING = object()
