"""Internal-document QA with search and citations: the first multi-turn (tool-use) vertical env.

Workflow: an employee asks one fact about a company's internal wiki: a product's price, launch date or owner,
a policy's limit, effective date or owner, a person's team, role or start date. Each task generates its own
corpus from its seed (20 to 60 short docs, ids ``D01``...), so the facts cannot be memorized: look-alike
entities with close values (``Nova Desk`` beside ``Nova Desk Pro``, ``Dana Whitfield`` beside ``Diana
Whitfield``), notes that quote draft values for the asked entity, and unrelated docs. The model calls
``<tool>search: words</tool>`` (BM25 over the corpus, top 5 ids and titles) and ``<tool>read: D07</tool>``
(a doc's text), then answers ``<answer>VALUE [D07]</answer>``: one value and one citation.

Rewarded (``rltk_rewards.docqa.doc_answer_cited``): 1 when the value is right (compared after normalizing
case, whitespace, number and date formats) AND the cited doc states that fact for the asked entity; a right
value with a wrong citation earns ``wrong_citation_credit`` (default 0). Anything else, a parse failure
included (no tags, several values or citations, junk around the citation), scores 0.

Difficulty: ``easy`` (20-25 docs, 1 look-alike, one hop), ``medium`` (35-45 docs, 3 look-alikes, a draft note
with a wrong value, one hop), ``hard`` (50-60 docs, two hops: "What team is the owner of X on?"; the owner
line links the person's doc, ``Owner: Dana Whitfield (D19)``, whose look-alikes own X's look-alikes).
:func:`grade` is the one answer parser, shared by the env's verdict and the reward. Option ``tool_calling``:
``"text"`` (the :mod:`rltk.tools` text protocol, as above) or ``"native"`` (the chat template's tool calling;
the tools' schemas travel with the task).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from rltk.env import SPLITS, Env, Episode, Message, Policy, Task, draw_task, prompt_hash, split_of
from rltk.tools import (
    STOP_STRINGS,
    FinalAnswer,
    ToolCall,
    ToolEpisode,
    ToolProtocol,
    parse_action,
    protocol_prompt,
)

DIFFICULTIES = ("easy", "medium", "hard")
_ANSWER = re.compile(r"([^\[\]]*)\[\s*D\s*(\d{1,3})\s*\]\s*", re.IGNORECASE)  # linear: no backtracking
_DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%B %d %Y", "%b %d %Y", "%d %B %Y", "%d %b %Y", "%m/%d/%Y")
_NUMBER = re.compile(r"(?:usd ?|\$ ?)?(\d+(?:\.\d+)?)(?: ?(?:usd|dollars?)\b)?(.*)")


@cache
def _data() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "data" / "doc_search_qa.json").read_text())


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


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def bm25(docs: dict[str, str], query: str, k: int, k1: float = 1.2, b: float = 0.75) -> list[str]:
    """Ids of the ``k`` best BM25 matches of ``query`` (ties by id); docs with no query word left out."""
    toks = {i: Counter(_tokens(t)) for i, t in docs.items()}
    lengths = {i: sum(c.values()) for i, c in toks.items()}
    avg = sum(lengths.values()) / max(1, len(lengths))
    df = Counter(w for c in toks.values() for w in c)
    scores = {}
    for i, tf in toks.items():
        s = sum(
            math.log(1 + (len(docs) - df[w] + 0.5) / (df[w] + 0.5))
            * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * lengths[i] / avg))
            for w in set(_tokens(query)) if w in tf
        )  # fmt: skip
        if s > 0:
            scores[i] = s
    return sorted(scores, key=lambda i: (-scores[i], i))[:k]


def system_prompt(tool_calling: str = "text") -> str:
    """The system message: the task, the tool protocol and the answer grammar (natively, no tool list)."""
    return _data()["system"].format(protocol=protocol_prompt(_data()["tools"], tool_calling))


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


def _names(rng: random.Random, family: str, n: int, avoid: set[str]) -> tuple[list[str], list[Any]]:
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


class DocSearchQAEnv(Env):
    """Answer one fact from a generated internal wiki with ``search``/``read`` tools, citing the doc.

    Args:
        difficulty: ``"easy"``, ``"medium"`` or ``"hard"`` (corpus size, look-alikes, draft notes, two hops).
        tool_calling: ``"text"`` (the plain-text tool protocol) or ``"native"`` (the chat template's).

    """

    name = "doc_search_qa"
    description = "Answer a fact from an internal wiki with search/read tools, citing the doc: VALUE [D07]."
    max_turns = 4  # search, read, (read the linked owner,) answer
    stop_strings = STOP_STRINGS
    default_rewards: ClassVar[dict[str, float]] = {"doc_answer_cited": 1.0}

    def __init__(self, difficulty: str = "easy", tool_calling: str = "text", **options: Any) -> None:
        super().__init__(**options)
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
        self.difficulty = difficulty
        self.protocol = ToolProtocol(_data()["tools"], tool_calling)
        self.stop_strings = self.protocol.stop_strings
        self.level = _data()["difficulties"][difficulty]
        self._modes: dict[str, str] | None = None

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split``, kinds stratified; prefix-stable, splits disjoint by prompt hash."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        kinds = _data()["kinds"][str(self.level["hops"])]
        out: list[Task] = []
        seen: set[str] = set()
        for i in range(n):
            family, attr = random.Random(f"{seed}:{split}:kind:{i // len(kinds)}").sample(kinds, len(kinds))[
                i % len(kinds)
            ]

            def draw(attempt: int, i: int = i, family: str = family, attr: str = attr) -> Task | None:
                rng = random.Random(f"{self.difficulty}:{seed}:{split}:{i}:{attempt}")
                names, topics = _names(rng, family, 1 + self.level["lookalikes"], set())
                company = rng.choice(_data()["companies"])
                question = _data()["questions"][str(self.level["hops"])][attr].format(entity=names[0])
                messages = [
                    {"role": "system", "content": system_prompt(self.protocol.tool_calling)},
                    {"role": "user", "content": _data()["user"].format(company=company, question=question)},
                ]
                if split_of(messages) != split or prompt_hash(messages) in seen:
                    return None  # checked before the corpus is built: building it is the costly part
                reference = self._corpus(rng, family, attr, names, topics)
                if reference is None:
                    return None
                info = {"difficulty": self.difficulty, "family": family, "attribute": attr}
                info["hops"] = self.level["hops"]
                task_id = f"{self.name}/{split}/{seed}/{i}"
                return Task(task_id, split, messages, reference, info, tools=self.protocol.schemas)

            out.append(draw_task(split, seen, draw))
        return out

    def _corpus(
        self, rng: random.Random, family: str, attr: str, names: list[str], topics: list[Any]
    ) -> dict[str, Any] | None:
        """Build the wiki around the asked entity; None if a search for its name would not list its doc."""
        data, level, two_hop = _data(), self.level, self.level["hops"] == 2
        n_docs = rng.randint(*level["docs"])
        avoid = {names[0].rsplit(" ", 1)[-1] if family == "person" else " ".join(names[0].split()[:2])}
        avoid |= {t["topic"] for t in topics if t}
        group = [_Doc(family, name, topic) for name, topic in zip(names, topics, strict=True)]
        owners = [_Doc("person", p) for p in _names(rng, "person", len(names), avoid)[0]] if two_hop else []
        people = [d for d in group + owners if d.family == "person"]
        entities = group + owners
        used = {d.title for d in entities}
        while len(entities) < n_docs - level["traps"] - level["notes"]:
            fam = ("person", "product", "policy")[len(used) % 3] if len(people) > 2 else "person"
            (name,), (topic,) = _names(rng, fam, 1, set(avoid))  # fillers never look like the asked ones
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

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        """Verdict on a final turn: ``correct`` (right value, cited doc supports it), its parts, the cite."""
        return _verdict(grade_completion(completion, task.reference))

    def episode(self, task: Task) -> Episode:
        """A tool episode over this task's corpus: ``search`` (BM25, top 5) and ``read`` (one doc)."""
        docs = task.reference["docs"]

        def search(query: str) -> str:
            if not _tokens(query):
                raise ValueError(f"empty query: write {self.protocol.call('search', 'a few words')}")
            hits = bm25(docs, query, _data()["top_k"])
            return "\n".join(f"{i} {docs[i].split(chr(10), 1)[0]}" for i in hits) or "no matching documents"

        def read(doc_id: str) -> str:
            m = re.fullmatch(r"\[?\s*D?\s*(\d{1,3})\s*\]?", doc_id.strip(), re.IGNORECASE)
            key = f"D{int(m.group(1)):02d}" if m else doc_id
            if key not in docs:
                raise ValueError(f"no document {doc_id!r}; ids look like D07")
            return docs[key]

        return ToolEpisode(
            task, {"search": search, "read": read}, lambda t: _verdict(grade(t, task.reference))
        )

    def oracle(self, messages: list[Message]) -> str:
        """Search the asked name, read the doc titled so (and the owner it links), answer citing its id."""
        hops, attr, entity = _question(messages)
        search_hits, reads = _observed(messages, self.protocol)
        doc_id = next((i for i, text in reads.items() if text.split("\n", 1)[0] == entity), None)
        if doc_id is None:
            hit = next((i for i, title in search_hits if title == entity), None)
            return self.protocol.call("read", hit) if hit else self.protocol.call("search", entity)
        if hops == 2:
            doc_id = re.search(r"^Owner: .+ \((D\d+)\)$", reads[doc_id], re.MULTILINE).group(1)
            if doc_id not in reads:
                return self.protocol.call("read", doc_id)
        return f"<answer>{_field(reads[doc_id], attr)} [{doc_id}]</answer>"

    def baselines(self) -> dict[str, Policy]:
        """Trivial policies, each answering in the grammar so that only its value and citation differ.

        A constant; the asked attribute's most frequent train value cited to the top search hit; the question
        echoed; the top search hit's first number, cited to it.
        """
        call = self.protocol.call

        def first_number(m: list[Message]) -> str:
            hits, reads = _observed(m, self.protocol)
            if not hits:
                return call("search", _question(m)[2])
            if hits[0][0] not in reads:
                return call("read", hits[0][0])
            num = re.search(r"\$?\d[\d,]*(?:\.\d+)?", reads[hits[0][0]].split("\n", 1)[-1])
            return f"<answer>{num.group(0) if num else 0} [{hits[0][0]}]</answer>"

        def most_frequent(m: list[Message]) -> str:
            hits, _ = _observed(m, self.protocol)
            if not hits:
                return call("search", _question(m)[2])
            return f"<answer>{self._mode(_question(m)[1])} [{hits[0][0]}]</answer>"

        return {
            "constant": lambda m: "<answer>$1,000 [D01]</answer>",
            "most_frequent_value": most_frequent,
            "echo_question": lambda m: f"<answer>{m[-1]['content'] if len(m) == 2 else ''}</answer>",
            "top_hit_first_number": first_number,
        }

    def _mode(self, attr: str) -> str:
        """The most frequent answer to ``attr`` questions over 300 train tasks (a prior, not a reading)."""
        if self._modes is None:
            counts: dict[str, Counter[str]] = {}
            for t in self.tasks("train", 300, seed=99):
                counts.setdefault(t.reference["attribute"], Counter())[t.reference["answer"]] += 1
            self._modes = {a: c.most_common(1)[0][0] for a, c in counts.items()}
        return self._modes.get(attr, "unknown")


def _verdict(g: Graded) -> dict[str, Any]:
    return {
        "correct": g.value_ok and g.cite_ok,
        "parsed": g.parsed,
        "value_correct": g.value_ok,
        "citation_correct": g.cite_ok,
        "cited": g.cited,
    }


def _question(messages: list[Message]) -> tuple[int, str, str]:
    """(hops, attribute, entity) read from the user turn through the question templates."""
    text = messages[1]["content"].split("Question: ", 1)[-1].strip()
    for hops, templates in _data()["questions"].items():
        for attr, template in templates.items():
            m = re.fullmatch(re.escape(template).replace(re.escape("{entity}"), "(.+)"), text)
            if m:
                return int(hops), attr, m.group(1)
    raise ValueError("prompt is not a doc_search_qa task")


def _observed(
    messages: list[Message], protocol: ToolProtocol
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(the last search's (id, title) hits, {doc id: text} of the docs read) from the conversation."""
    hits: list[tuple[str, str]] = []
    reads: dict[str, str] = {}
    for action, obs in zip(messages[2::2], messages[3::2], strict=False):
        call, body = protocol.parse(action["content"]), protocol.result(obs["content"])
        if not isinstance(call, ToolCall) or body is None:
            continue
        if call.name == "search":
            hits = [tuple(line.split(" ", 1)) for line in body.splitlines() if re.match(r"D\d+ ", line)]
        elif call.name == "read":
            reads[call.argument.strip().upper()] = body
    return hits, reads


def _field(text: str, attr: str) -> str:
    label = {a: lab for f in _data()["fields"].values() for a, lab in f.items()}[attr]
    value = re.search(rf"^{re.escape(label)}: (.+)$", text, re.MULTILINE).group(1)
    return re.sub(r" \(D\d+\)$", "", value)
