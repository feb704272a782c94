"""The generated wiki of ``doc_search_qa``: entities and their look-alikes, trap notes, and BM25 search.

:func:`build_corpus` writes one task's corpus from its rng: the asked entity and look-alikes with close
values, draft notes quoting wrong values, unrelated filler docs, shuffled and numbered ``D01``...; each doc is
a title line and ``Label: value`` lines. :func:`bm25` is the search the env's ``search`` tool runs over it.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from datetime import date, timedelta
from typing import Any

from rltk_envs import data
from rltk_rewards.docqa import same_value


def _data() -> dict[str, Any]:
    return data("doc_search_qa")


def tokens(text: str) -> list[str]:
    """The lower-cased words (letter and digit runs) of ``text``: what BM25 indexes and matches."""
    return re.findall(r"[a-z0-9]+", text.lower())


def bm25(docs: dict[str, str], query: str, k: int, k1: float = 1.2, b: float = 0.75) -> list[str]:
    """Ids of the ``k`` best BM25 matches of ``query`` (ties by id); docs with no query word left out."""
    toks = {i: Counter(tokens(t)) for i, t in docs.items()}
    lengths = {i: sum(c.values()) for i, c in toks.items()}
    avg = sum(lengths.values()) / max(1, len(lengths))
    df = Counter(w for c in toks.values() for w in c)
    scores = {}
    for i, tf in toks.items():
        s = sum(
            math.log(1 + (len(docs) - df[w] + 0.5) / (df[w] + 0.5))
            * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * lengths[i] / avg))
            for w in set(tokens(query)) if w in tf
        )  # fmt: skip
        if s > 0:
            scores[i] = s
    return sorted(scores, key=lambda i: (-scores[i], i))[:k]


def _fmt_date(d: date, rng: random.Random) -> str:
    return rng.choice((d.isoformat(), f"{d:%B} {d.day}, {d.year}", f"{d.day} {d:%b} {d.year}"))


def _value(rng: random.Random, attr: str, topic: dict[str, Any] | None, people: list[str]) -> str:
    """A random value of ``attr`` as a doc writes it (``people``: the names an owner is drawn from)."""
    data = _data()
    if attr in ("launch", "effective", "start"):
        lo, hi = data["years"]
        return _fmt_date(date(lo, 1, 1) + timedelta(days=rng.randrange((hi - lo) * 365)), rng)
    if attr == "price":
        n = rng.randint(data["price"]["lo"], data["price"]["hi"])
        return rng.choice((f"${n:,}", f"${n:,}.00", f"{n:,} USD"))
    if attr == "limit":
        assert topic is not None
        n = rng.randrange(topic["lo"], topic["hi"] + 1, topic["step"])
        return f"${n:,} {topic['unit']}" if topic["money"] else f"{n} {topic['unit']}"
    pools = {"owner": people, "team": data["teams"], "role": data["roles"], "location": data["locations"]}
    pools |= {"category": data["categories"], "scope": data["scope_groups"]}
    return rng.choice(pools[attr])


class _Doc:
    """One wiki page before ids are dealt: an entity's fields, or a note's body."""

    def __init__(self, family: str, title: str, topic: dict[str, Any] | None = None, body: str = "") -> None:
        self.family, self.title, self.topic, self.body = family, title, topic, body
        self.fields: dict[str, str] = {}
        self.id = ""


def lookalikes(rng: random.Random, family: str, n: int, avoid: set[str]) -> tuple[list[str], list[Any]]:
    """``n`` look-alike names of one family (a shared base) and each one's policy topic (None elsewhere)."""
    data = _data()
    for _ in range(1000):
        if family == "product":
            base = f"{rng.choice(data['product_prefixes'])} {rng.choice(data['product_nouns'])}"
            names = [f"{base} {v}".strip() for v in rng.sample(data["product_variants"], n)]
            topics: list[Any] = [None] * n
        elif family == "policy":
            topic = rng.choice(data["policy_topics"])
            base = topic["topic"]
            names = [
                f"{base} Policy" + (f" ({s})" if s else "") for s in rng.sample(data["policy_scopes"], n)
            ]
            topics = [topic] * n
        else:
            base = rng.choice(data["last_names"])
            names = [f"{f} {base}" for f in rng.sample(rng.choice(data["first_name_groups"]), n)]
            topics = [None] * n
        if base not in avoid:
            avoid.add(base)
            return names, topics
    raise RuntimeError("ran out of names")  # pragma: no cover


def build_corpus(
    rng: random.Random, level: dict[str, Any], family: str, attr: str, names: list[str], topics: list[Any]
) -> dict[str, Any] | None:
    """The task's reference: the wiki built around the asked entity ``names[0]`` (its look-alikes next).

    ``level`` is the difficulty's entry of the data file. Returns ``{"answer", "support", "entity",
    "attribute", "docs": {id: text}}``, or None where a search for the asked name would not list its doc.
    """
    data, two_hop = _data(), level["hops"] == 2
    n_docs = rng.randint(*level["docs"])
    avoid = {names[0].rsplit(" ", 1)[-1] if family == "person" else " ".join(names[0].split()[:2])}
    avoid |= {t["topic"] for t in topics if t}
    group = [_Doc(family, name, topic) for name, topic in zip(names, topics, strict=True)]
    owners = [_Doc("person", p) for p in lookalikes(rng, "person", len(names), avoid)[0]] if two_hop else []
    people = [d for d in group + owners if d.family == "person"]
    entities = group + owners
    used = {d.title for d in entities}
    while len(entities) < n_docs - level["traps"] - level["notes"]:
        fam = ("person", "product", "policy")[len(used) % 3] if len(people) > 2 else "person"
        (name,), (topic,) = lookalikes(rng, fam, 1, set(avoid))  # fillers never look like the asked ones
        if name not in used:
            used.add(name)
            entities.append(_Doc(fam, name, topic))
            people += [entities[-1]] if fam == "person" else []
    names_of_people = [p.title for p in people]
    fields = data["fields"]
    for doc in entities:
        for a in fields[doc.family]:
            doc.fields[a] = _value(rng, a, doc.topic, names_of_people)
    if two_hop:  # X's owner is the asked person; X's look-alikes are owned by that person's look-alikes
        for doc, owner in zip(group, owners, strict=True):
            doc.fields["owner"] = owner.title
    asked = owners if two_hop else group
    for doc in asked[1:]:  # look-alikes differ from the asked entity on the asked attribute
        while same_value(doc.fields[attr], asked[0].fields[attr]):
            doc.fields[attr] = _value(rng, attr, doc.topic, names_of_people)
    by_family = {f: [a for a in fields[f] if a not in ("category", "scope", "location")] for f in fields}
    notes: list[_Doc] = []
    subjects = [(asked[0], attr), (group[0], "owner")][: level["traps"]]
    subjects += [(d, rng.choice(by_family[d.family])) for d in rng.sample(entities, level["notes"])]
    for doc, a in subjects:
        wrong = doc.fields[a]
        while same_value(wrong, doc.fields[a]):
            wrong = _value(rng, a, doc.topic, names_of_people)
        title = f"{rng.choice(data['note_kinds'])}: {doc.title}"
        if all(title != x.title for x in notes):
            notes.append(
                _Doc("note", title, body=data["trap_notes"][a].format(entity=doc.title, value=wrong))
            )
    docs = entities + notes
    rng.shuffle(docs)
    for k, doc in enumerate(docs):
        doc.id = f"D{k + 1:02d}"
    ids = {d.title: d.id for d in people}
    texts = {}
    for doc in docs:
        lines = [doc.body] if doc.family == "note" else []
        for a in rng.sample(list(doc.fields), len(doc.fields)):
            v = doc.fields[a]
            lines.append(f"{fields[doc.family][a]}: {v}" + (f" ({ids[v]})" if a == "owner" else ""))
        texts[doc.id] = "\n".join([doc.title, *lines])
    if group[0].id not in bm25(texts, names[0], data["top_k"]):
        return None
    return {
        "answer": asked[0].fields[attr],
        "support": [asked[0].id],
        "entity": names[0],
        "attribute": attr,
        "docs": texts,
    }
