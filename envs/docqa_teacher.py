"""The teacher of ``doc_search_qa``: the help desk's wiki macro, which trusts the search's top hit.

Workflow it stands for: a fixed three-step chain, the way a help desk answers wiki questions today. It
searches the question with the asked name cut to its first two words (the macro's short keyword box keeps a
name's head: a person's full name, but only a product's line, ``Nova Desk`` for ``Nova Desk Pro``, and a
policy's topic, ``Travel Expense`` for ``Travel Expense Policy (EMEA)``), reads the top hit, and answers the
asked field from that page, citing it. Like the oracle it reads only the conversation (through the env's
own prompt readers), and it speaks the task's tool protocol, text or native.

How it fails, and on which cue: it never checks that the page it read is the one asked about.

- A product or policy question (``Task.info["family"]`` ``product`` or ``policy``; cue: the asked name has
  words after its two-word head): the search lists the asked page and its look-alikes of the same line or
  topic, and about half the time a look-alike ranks first, so it answers the look-alike's value.
- Medium and hard tasks (``Task.info["difficulty"]``): a draft note about the asked name usually ranks
  first, and it answers the draft value the note quotes; a two-hop question (hard: the owner's team, role
  or start) it answers from the first page without following the owner link.

Person questions at easy it answers right. A page without the asked field gets ``unknown`` cited to it, and
an unreadable conversation ``unknown [D01]``: its output is always one well-formed ``<answer>VALUE [Dnn]``.

Measured accuracy (``correct``; seed 0, 200 tasks; the recipe's options ``{difficulty: easy}`` are the env's
defaults, so the first row covers both; the others for reference: native prompts are other tasks, and at
medium and hard the draft notes and two hops put it below its bounds, trivial + 15 points):

=====================  ===============  ===============  =======================  ================
options                teacher (eval)   teacher (test)   best trivial eval/test   oracle eval/test
=====================  ===============  ===============  =======================  ================
easy (default)         0.695            0.705            0.060 / 0.085            1.000 / 1.000
easy, native tools     0.665            0.675            0.085 / 0.100            1.000 / 1.000
medium                 0.025            0.025            0.000 / 0.000            1.000 / 1.000
hard                   0.000            0.000            0.000 / 0.000            1.000 / 1.000
=====================  ===============  ===============  =======================  ================

All of its errors (100%) fall in the named slices (easy: 61 of 61 on eval, 59 of 59 on test). Its easy
accuracy on other eval seeds: 0.665 (1), 0.730 (2), 0.700 (3).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from rltk_envs.doc_search_qa import _data, _observed, _question

from rltk.env import Message, Teacher
from rltk.tools import ToolProtocol

UNREADABLE = "<answer>unknown [D01]</answer>"


class TopHitTeacher(Teacher):
    """Search the question (the name cut to its head), read the top hit, answer its field citing it.

    Args:
        protocol: The env's tool protocol (text or native), used to write its calls and read the results.

    Attributes:
        weak_slices: Product and policy questions (look-alikes share the searched head), and the medium and
            hard levels (draft notes rank first; two-hop questions are answered from the first page).

    """

    weak_slices: ClassVar[dict[str, tuple[Any, ...]]] = {
        "family": ("product", "policy"),
        "difficulty": ("medium", "hard"),
    }

    def __init__(self, protocol: ToolProtocol) -> None:
        self.protocol = protocol

    def __call__(self, messages: list[Message]) -> str:
        """The chain's next turn: search, read the top hit, or the final ``<answer>``; never raises."""
        try:
            _, attr, entity = _question(messages)
            hits, reads = _observed(messages, self.protocol)
            searched = any(m.get("role") == "assistant" for m in messages)
        except Exception:  # not a doc_search_qa conversation: answer, in the format, that it is unknown
            return UNREADABLE
        if not searched:
            question = messages[1]["content"].split("Question: ", 1)[-1].strip()
            head = " ".join(entity.split()[:2])
            return self.protocol.call("search", question.replace(entity, head, 1))
        if not hits:
            return UNREADABLE  # the search failed or found nothing: nothing to read
        top = hits[0][0]
        if top not in reads:
            return self.protocol.call("read", top)
        return f"<answer>{_answer_from(reads[top], attr)} [{top}]</answer>"


def _answer_from(page: str, attr: str) -> str:
    """The asked field's value on ``page``; on a note, the value it quotes; else ``unknown``."""
    label = next(labels[attr] for labels in _data()["fields"].values() if attr in labels)
    line = re.search(rf"^{re.escape(label)}: (.+?)(?: \(D\d+\))?$", page, re.MULTILINE)
    if line:
        return line.group(1)
    template = re.escape(_data()["trap_notes"][attr])
    note = template.replace(re.escape("{entity}"), ".+?").replace(re.escape("{value}"), "(.+?)")
    quoted = re.search(rf"^{note}$", page, re.MULTILINE)
    value = quoted.group(1).strip() if quoted else ""
    return value if value and "[" not in value and "]" not in value else "unknown"
