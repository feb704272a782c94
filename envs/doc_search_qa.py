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
:func:`rltk_rewards.docqa.grade` is the one answer parser, shared by the env's verdict and the reward;
:mod:`rltk_envs.doc_corpus` builds each task's wiki and searches it. Option ``tool_calling``: ``"text"`` (the
:mod:`rltk.tools` text protocol, as above) or ``"native"`` (the chat template's tool calling; the tools'
schemas travel with the task).

Teacher (:class:`rltk_envs.docqa_teacher.TopHitTeacher`): the help desk's fixed chain, which searches the
question with the asked name cut to its first two words, reads the top hit and answers from it. It gets
product and policy questions wrong whenever a look-alike of the same line or topic ranks first (about half
of them), and nearly every medium and hard task (a draft note ranks first; two hops are never followed).
Accuracy on 200 tasks, seed 0, at easy (the recipe's and default options): 0.695 eval, 0.705 test, beside
the oracle's 1.0 and the best trivial policy's 0.06 / 0.085; all of its errors lie in those slices.

Best-of-N votes on ``(value, citation)``: :meth:`DocSearchQAEnv.final_answer`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any, ClassVar

from rltk_envs import data
from rltk_envs.doc_corpus import bm25, build_corpus, lookalikes, tokens
from rltk_rewards.docqa import Graded, canon, grade, grade_completion

from rltk.env import (
    SPLITS,
    Episode,
    FinalAnswer,
    Message,
    Policy,
    Task,
    Teacher,
    check_choice,
    draw_task,
    prompt_hash,
    split_of,
)
from rltk.tools import FinalAnswer as AnswerTurn
from rltk.tools import ToolCall, ToolEnv, ToolEpisode, ToolProtocol, protocol_prompt

DIFFICULTIES = ("easy", "medium", "hard")


def _data() -> dict[str, Any]:
    return data("doc_search_qa")


def system_prompt(tool_calling: str = "text") -> str:
    """The system message: the task, the tool protocol and the answer grammar (natively, no tool list)."""
    return _data()["system"].format(protocol=protocol_prompt(_data()["tools"], tool_calling))


class DocSearchQAEnv(ToolEnv):
    """Answer one fact from a generated internal wiki with ``search``/``read`` tools, citing the doc.

    Args:
        difficulty: ``"easy"``, ``"medium"`` or ``"hard"`` (corpus size, look-alikes, draft notes, two hops).
        tool_calling: ``"text"`` (the plain-text tool protocol) or ``"native"`` (the chat template's).

    """

    name = "doc_search_qa"
    description = "Answer a fact from an internal wiki with search/read tools, citing the doc: VALUE [D07]."
    max_new_tokens = 32  # the longest oracle turn is 21 tokens (digits tokenize one by one)
    max_turns = 4  # search, read, (read the linked owner,) answer
    default_rewards: ClassVar[dict[str, float]] = {"doc_answer_cited": 1.0}

    def __init__(self, difficulty: str = "easy", tool_calling: str = "text", **options: Any) -> None:
        super().__init__(_data()["tools"], tool_calling, **options)
        check_choice("difficulty", difficulty, DIFFICULTIES)
        self.difficulty = difficulty
        self.level = _data()["difficulties"][difficulty]
        self._modes: dict[str, str] | None = None

    def tasks(self, split: str, n: int, seed: int = 0) -> list[Task]:
        """``n`` tasks of ``split``, kinds stratified; prefix-stable, splits disjoint by prompt hash."""
        check_choice("split", split, SPLITS)
        kinds = _data()["kinds"][str(self.level["hops"])]
        out: list[Task] = []
        seen: set[str] = set()
        for i in range(n):
            family, attr = random.Random(f"{seed}:{split}:kind:{i // len(kinds)}").sample(kinds, len(kinds))[
                i % len(kinds)
            ]

            def draw(attempt: int, i: int = i, family: str = family, attr: str = attr) -> Task | None:
                rng = random.Random(f"{self.difficulty}:{seed}:{split}:{i}:{attempt}")
                names, topics = lookalikes(rng, family, 1 + self.level["lookalikes"], set())
                company = rng.choice(_data()["companies"])
                question = _data()["questions"][str(self.level["hops"])][attr].format(entity=names[0])
                messages = [
                    {"role": "system", "content": system_prompt(self.protocol.tool_calling)},
                    {"role": "user", "content": _data()["user"].format(company=company, question=question)},
                ]
                if split_of(messages) != split or prompt_hash(messages) in seen:
                    return None  # checked before the corpus is built: building it is the costly part
                reference = build_corpus(rng, self.level, family, attr, names, topics)
                if reference is None:
                    return None
                info = {"difficulty": self.difficulty, "family": family, "attribute": attr}
                info["hops"] = self.level["hops"]
                task_id = f"{self.name}/{split}/{seed}/{i}"
                return Task(task_id, split, messages, reference, info, tools=self.protocol.schemas)

            out.append(draw_task(split, seen, draw))
        return out

    def check(self, task: Task, completion: str) -> dict[str, Any]:
        """Verdict on a final turn: ``correct`` (right value, cited doc supports it), its parts, the cite."""
        return _verdict(grade_completion(completion, task.reference))

    def episode(self, task: Task) -> Episode:
        """A tool episode over this task's corpus: ``search`` (BM25, top 5) and ``read`` (one doc)."""
        docs = task.reference["docs"]

        def search(query: str) -> str:
            if not tokens(query):
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

    def teacher(self) -> Teacher:
        """The help desk's search-read-answer chain, trusting the top hit (:mod:`rltk_envs.docqa_teacher`)."""
        from rltk_envs.docqa_teacher import TopHitTeacher  # it reads conversations with this module's readers

        return TopHitTeacher(self.protocol)

    def final_answer(self, messages: list[Message], actions: list[str]) -> FinalAnswer:
        """The last turn's ``<answer>VALUE [Dnn]</answer>`` as a vote key ``(canon(VALUE), "Dnn")``.

        Read without the reference, by the reward's own parser (:func:`rltk_rewards.docqa.grade`); the value
        normalized as the reward compares it (:func:`rltk_rewards.docqa.canon`: case, whitespace, number and
        date formats). The citation is part of the key: the reward pays a right value only under a citation of
        the page that states it, so the same value under two citations is two answers, and a vote on values
        alone could pick a sample citing a look-alike. A bare number and the same number with its unit
        (``12`` and ``12 weeks``) are two keys: without the reference a bare number's unit is unknown.

        Returns:
            ``((kind, value, unit), "Dnn")``, or None (the sample abstains) when the last turn is not one
            well-formed answer (a tool call, two citations or answers) or its value normalizes to nothing.

        """
        turn = self.protocol.parse(actions[-1]) if actions else None
        if not isinstance(turn, AnswerTurn):
            return None
        graded = grade(turn.text, {"answer": "", "support": ()})
        value = canon(turn.text.rsplit("[", 1)[0])
        return (value, graded.cited) if graded.parsed and value[1] else None

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
