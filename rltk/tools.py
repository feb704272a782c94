"""Tool use for small models: a plain-text protocol, its parser, and an episode that runs Python tools.

A 135M model cannot be relied on to write JSON, but it can copy a short tag pattern. Each assistant turn is
one action:

    <tool>name: argument</tool>     call a tool; the env answers with <result>...</result> (or <error>...)
    <answer>text</answer>           the final answer; the episode ends and the env judges it

Text before the tag is allowed (room to think) and ignored; anything else is a malformed turn, answered with
an ``<error>`` observation that says what was wrong and what to write instead, never a crash: several tags
in one turn (a hedge), an unknown tool, an unclosed tag (the turn hit its token limit), an empty turn.
Generation stops at the closing tags (:data:`STOP_STRINGS`), so a turn holds at most one action.

Tools are plain Python callables ``tool(argument: str) -> str`` bound to one episode's own state (an
:class:`ToolEpisode` is built per rollout, so rollouts never share state). A tool that raises is answered
with ``<error>``; its result is cut to ``max_result_chars``.

The observation goes back as a ``user`` turn (SmolLM2's chat template has no tool role); the rollout stage
renders it with the chat template and masks it out of the loss.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rltk.env import Episode, Step, Task

STOP_STRINGS = ("</tool>", "</answer>")
_TAG = re.compile(r"<(tool|answer)>(.*?)</\1>", re.DOTALL)
_OPEN = re.compile(r"<(tool|answer)>")
_CALL = re.compile(r"\s*([A-Za-z_][\w-]*)\s*(?::\s*(.*?))?\s*", re.DOTALL)

Tool = Callable[[str], str]


@dataclass(frozen=True)
class ToolCall:
    """``<tool>name: argument</tool>``."""

    name: str
    argument: str


@dataclass(frozen=True)
class FinalAnswer:
    """``<answer>text</answer>``."""

    text: str


@dataclass(frozen=True)
class Malformed:
    """A turn that is neither one call nor one answer; ``error`` says what to do instead."""

    error: str


Action = ToolCall | FinalAnswer | Malformed


def parse_action(text: str, tools: Mapping[str, Any] | None = None) -> Action:
    """Parse one assistant turn; never raises.

    Args:
        text: The turn as decoded (untrusted).
        tools: Valid tool names (a call to another name is :class:`Malformed`); ``None`` accepts any name.

    Returns:
        The action.

    >>> parse_action("I will look it up. <tool>lookup_order: A-17</tool>")
    ToolCall(name='lookup_order', argument='A-17')
    >>> parse_action("<answer> 42 </answer>")
    FinalAnswer(text='42')
    >>> parse_action("<answer>1</answer><answer>2</answer>").error
    'one action per turn: write a single <tool>...</tool> or <answer>...</answer>'
    >>> parse_action("<tool>drop_table: x</tool>", {"lookup": None}).error
    "unknown tool 'drop_table'; tools: lookup"

    """
    if not isinstance(text, str) or not text.strip():
        return Malformed(
            "empty turn: call a tool as <tool>name: argument</tool> or answer as <answer>...</answer>"
        )
    tags = _TAG.findall(text)
    if len(tags) > 1 or len(_OPEN.findall(text)) > 1:
        return Malformed("one action per turn: write a single <tool>...</tool> or <answer>...</answer>")
    if not tags:
        if _OPEN.search(text):
            return Malformed("unclosed tag: end the call with </tool> or the answer with </answer>")
        return Malformed(
            "no action: call a tool as <tool>name: argument</tool> or answer as <answer>...</answer>"
        )
    kind, body = tags[0]
    if kind == "answer":
        return FinalAnswer(body.strip())
    call = _CALL.fullmatch(body)
    if not call:
        return Malformed("bad call: write <tool>name: argument</tool>")
    name, argument = call.group(1), (call.group(2) or "").strip()
    if tools is not None and name not in tools:
        return Malformed(f"unknown tool {name!r}; tools: {', '.join(sorted(tools)) or '(none)'}")
    return ToolCall(name, argument)


def protocol_prompt(tools: Mapping[str, str]) -> str:
    """The system-prompt section that explains the protocol and lists ``{tool name: one-line description}``.

    >>> print(protocol_prompt({"search": "search(query): ids of matching documents"}))
    Tools (call one per turn, then wait for its result):
    <tool>search: query</tool> - search(query): ids of matching documents
    When you know the answer, reply <answer>your answer</answer>.
    """
    lines = ["Tools (call one per turn, then wait for its result):"]
    lines += [f"<tool>{name}: {_arg_name(doc)}</tool> - {doc}" for name, doc in tools.items()]
    lines.append("When you know the answer, reply <answer>your answer</answer>.")
    return "\n".join(lines)


def _arg_name(doc: str) -> str:
    m = re.match(r"\s*[\w-]+\((\w*)\)", doc)
    return m.group(1) if m and m.group(1) else "argument"


class ToolEpisode(Episode):
    """One rollout of a tool-using workflow: runs the model's calls on this episode's own tools.

    Subclasses may override :meth:`unfinished_outcome` (the verdict of an episode a limit ended).

    Args:
        task: The task.
        tools: ``{name: tool}``, callables bound to this episode's state.
        judge: Called with the final answer's text; returns the env's verdict (``Episode.outcome``).
        max_result_chars: Tool results longer than this are cut (with a note saying so).

    """

    def __init__(
        self,
        task: Task,
        tools: Mapping[str, Tool],
        judge: Callable[[str], dict[str, Any]],
        max_result_chars: int = 2000,
    ) -> None:
        super().__init__(task)
        self.tools = dict(tools)
        self.judge = judge
        self.max_result_chars = max_result_chars
        self.calls: list[ToolCall] = []
        self.errors = 0
        self.outcome = self.unfinished_outcome()

    def unfinished_outcome(self) -> dict[str, Any]:
        """The verdict while no answer has been given (and after a turn or token limit ends the episode)."""
        return {"correct": False, "answered": False}

    def step(self, action: str) -> Step:
        """Run one turn: a call gets ``<result>``/``<error>``, an answer ends the episode."""
        self.actions.append(action)
        parsed = parse_action(action, self.tools)
        if isinstance(parsed, FinalAnswer):
            self.outcome = {"answered": True, **self.judge(parsed.text)}
            return Step(observation=None, done=True)
        if isinstance(parsed, Malformed):
            self.errors += 1
            return Step(observation=f"<error>{parsed.error}</error>", done=False)
        self.calls.append(parsed)
        try:
            result = str(self.tools[parsed.name](parsed.argument))
        except Exception as exc:  # a tool failing on bad model input is an observation, not a crash
            self.errors += 1
            return Step(observation=f"<error>{parsed.name} failed: {exc}</error>", done=False)
        if len(result) > self.max_result_chars:
            result = result[: self.max_result_chars] + f"... [cut at {self.max_result_chars} characters]"
        return Step(observation=f"<result>{result}</result>", done=False)
