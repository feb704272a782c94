"""Tool use for small models: two ways to call a tool, their parsers, and an episode that runs Python tools.

A tool env offers its tools in one of two ways (its ``tool_calling`` option, read by :class:`ToolProtocol`).

``"text"`` (default): a plain-text protocol. A 135M model cannot be relied on to write JSON, but it can copy a
short tag pattern. The system prompt lists the tools (:func:`protocol_prompt`) and each assistant turn is one
action:

    <tool>name: argument</tool>     call a tool; the env answers with <result>...</result> (or <error>...)
    <answer>text</answer>           the final answer; the episode ends and the env judges it

``"native"``: the chat template's own tool calling, for models trained on it. The tools travel with the task
as JSON schemas (``Task.tools``, :func:`tool_schemas`), the chat template renders them, and the model calls
a tool in the Hermes/Qwen format; the env answers with the tool's result (or an ``<error>...</error>``) in a
``tool`` message, which the template renders. The final answer is still ``<answer>text</answer>``:

    <tool_call>
    {"name": "lookup_order", "arguments": {"order_id": "K-9180"}}
    </tool_call>

In both, text before the tag is allowed (room to think) and ignored; anything else is a malformed turn,
answered with an ``<error>`` observation that says what was wrong and what to write instead, never a crash:
several tags in one turn (a hedge), an unknown tool, an unclosed tag (the turn hit its token limit), an empty
turn; natively also bad JSON and missing or unexpected arguments. Generation stops at the closing tags
(:data:`STOP_STRINGS`, :data:`NATIVE_STOP_STRINGS`), so a turn holds at most one action.

Tools are plain Python callables ``tool(argument: str) -> str`` bound to one episode's own state (an
:class:`ToolEpisode` is built per rollout, so rollouts never share state); natively, a tool has one string
parameter. A tool that raises is answered with ``<error>``; its result is cut to ``max_result_chars``.

In text mode the observation goes back as a ``user`` turn (SmolLM2's chat template has no tool role); in
native mode as a ``tool`` turn (``Task.observation_role``). The rollout stage renders it with the chat
template and masks it out of the loss.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rltk.env import Env, Episode, Step, Task, check_choice

TOOL_CALLING = ("text", "native")  # the values of a tool env's ``tool_calling`` option
STOP_STRINGS = ("</tool>", "</answer>")
NATIVE_STOP_STRINGS = ("</tool_call>", "</answer>")
NATIVE_CALL = '<tool_call>{"name": "...", "arguments": {...}}</tool_call>'
_CALL = re.compile(r"\s*([A-Za-z_][\w-]*)\s*(?::\s*(.*?))?\s*", re.DOTALL)
_SIGNATURE = re.compile(r"\s*[\w-]+\((\w*)\)")

Tool = Callable[[str], str]
Schema = dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters"}}


@dataclass(frozen=True)
class ToolCall:
    """``<tool>name: argument</tool>``, or a native call of ``name`` with its one argument."""

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


def _one_action(text: str, tag: str, call: str) -> tuple[str, str] | Malformed:
    """The ``(kind, body)`` of a turn's one ``<tag>``/``<answer>`` element, or what is wrong with the turn."""
    hint = f"call a tool as {call} or answer as <answer>...</answer>"
    if not isinstance(text, str) or not text.strip():
        return Malformed(f"empty turn: {hint}")
    tags = re.findall(rf"<({tag}|answer)>(.*?)</\1>", text, re.DOTALL)
    if len(tags) > 1 or len(re.findall(rf"<(?:{tag}|answer)>", text)) > 1:
        return Malformed(f"one action per turn: write a single <{tag}>...</{tag}> or <answer>...</answer>")
    if not tags:
        if re.search(rf"<(?:{tag}|answer)>", text):
            return Malformed(f"unclosed tag: end the call with </{tag}> or the answer with </answer>")
        return Malformed(f"no action: {hint}")
    return tags[0]


def parse_action(text: str, tools: Mapping[str, Any] | None = None) -> Action:
    """Parse one assistant turn of the text protocol; never raises.

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
    found = _one_action(text, "tool", "<tool>name: argument</tool>")
    if isinstance(found, Malformed):
        return found
    kind, body = found
    if kind == "answer":
        return FinalAnswer(body.strip())
    call = _CALL.fullmatch(body)
    if not call:
        return Malformed("bad call: write <tool>name: argument</tool>")
    name, argument = call.group(1), (call.group(2) or "").strip()
    if tools is not None and name not in tools:
        return Malformed(f"unknown tool {name!r}; tools: {', '.join(sorted(tools)) or '(none)'}")
    return ToolCall(name, argument)


def parse_tool_call(text: str, tools: Sequence[Schema] | None = None) -> Action:
    r"""Parse one assistant turn of native tool calling (Hermes/Qwen ``<tool_call>`` JSON); never raises.

    Args:
        text: The turn as decoded (untrusted).
        tools: The tool schemas (:func:`tool_schemas`): a call must name one of them and pass exactly its
            parameters. ``None`` accepts any name with at most one argument.

    Returns:
        The action; a call's one argument (a string, or a number written as it reads) is ``argument``.

    >>> parse_tool_call('<tool_call>\n{"name": "read", "arguments": {"doc_id": "D07"}}\n</tool_call>')
    ToolCall(name='read', argument='D07')
    >>> parse_tool_call('<tool_call>{"name": "read", "arguments": {"doc_id": D07}}</tool_call>').error[:27]
    'bad JSON in the tool call: '
    >>> schemas = tool_schemas({"read": "read(doc_id): a document's text"})
    >>> turn = '<tool_call>{"name": "read", "arguments": {"id": 7}}</tool_call>'
    >>> print(parse_tool_call(turn, schemas).error)
    unexpected argument 'id', missing argument 'doc_id': write <tool_call>
    {"name": "read", "arguments": {"doc_id": "..."}}
    </tool_call>

    """
    found = _one_action(text, "tool_call", NATIVE_CALL)
    if isinstance(found, Malformed):
        return found
    kind, body = found
    if kind == "answer":
        return FinalAnswer(body.strip())
    try:
        call = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return Malformed(f"bad JSON in the tool call: {exc}; write {NATIVE_CALL}")
    name = call.get("name") if isinstance(call, dict) else None
    args = call.get("arguments", {}) if isinstance(call, dict) else None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return Malformed(
            f'a tool call is one JSON object with a "name" and an "arguments" object: {NATIVE_CALL}'
        )
    if tools is not None:
        known = {s["function"]["name"]: s["function"].get("parameters", {}) for s in tools}
        if name not in known:
            return Malformed(f"unknown tool {name!r}; tools: {', '.join(sorted(known)) or '(none)'}")
        params = list(known[name].get("properties", {}))
        wrong = [f"unexpected argument {k!r}" for k in args if k not in params]
        wrong += [f"missing argument {k!r}" for k in known[name].get("required", []) if k not in args]
        if wrong:
            return Malformed(f"{', '.join(wrong)}: write {native_call(name, dict.fromkeys(params, '...'))}")
    if len(args) > 1:
        return Malformed(f"a tool takes one argument: write {NATIVE_CALL}")
    key, value = next(iter(args.items()), ("", ""))
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return Malformed(
            f"argument {key!r} of {name} must be a string: write {native_call(name, {key: '...'})}"
        )
    return ToolCall(name, str(value).strip())


def native_call(name: str, arguments: Mapping[str, str]) -> str:
    """A native tool call as the model writes it (Hermes/Qwen format).

    >>> print(native_call("search", {"query": "Nova Desk"}))
    <tool_call>
    {"name": "search", "arguments": {"query": "Nova Desk"}}
    </tool_call>
    """
    call = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
    return f"<tool_call>\n{call}\n</tool_call>"


def tool_schemas(tools: Mapping[str, str]) -> list[Schema]:
    """JSON schemas (OpenAI function format) of ``{tool name: one-line doc}``: one string parameter each.

    The parameter is named after the doc's signature (``search(query): ...``; ``argument`` where it has
    none) and the description is the doc after the signature.

    >>> tool_schemas({"search": "search(query): ids of matching documents"})[0]["function"]
    {'name': 'search', 'description': 'ids of matching documents', 'parameters': {'type': 'object', \
'properties': {'query': {'type': 'string'}}, 'required': ['query']}}
    """
    out = []
    for name, doc in tools.items():
        m, arg = _SIGNATURE.match(doc), _arg_name(doc)
        parameters = {"type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]}
        description = doc[m.end() :].lstrip(" :") if m else doc
        out.append(
            {
                "type": "function",
                "function": {"name": name, "description": description, "parameters": parameters},
            }
        )
    return out


def protocol_prompt(tools: Mapping[str, str], tool_calling: str = "text") -> str:
    """The system-prompt section that explains how to call ``{tool name: one-line description}``.

    In text mode it lists the tools; natively the chat template lists them (``Task.tools``), so it does not.

    >>> print(protocol_prompt({"search": "search(query): ids of matching documents"}))
    Tools (call one per turn, then wait for its result):
    <tool>search: query</tool> - search(query): ids of matching documents
    When you know the answer, reply <answer>your answer</answer>.
    >>> print(protocol_prompt({"search": "search(query): ids of matching documents"}, "native"))
    Call one tool per turn, then wait for its result.
    When you know the answer, reply <answer>your answer</answer>.
    """
    if tool_calling == "native":
        lines = ["Call one tool per turn, then wait for its result."]
    else:
        lines = ["Tools (call one per turn, then wait for its result):"]
        lines += [f"<tool>{name}: {_arg_name(doc)}</tool> - {doc}" for name, doc in tools.items()]
    lines.append("When you know the answer, reply <answer>your answer</answer>.")
    return "\n".join(lines)


def _arg_name(doc: str) -> str:
    m = _SIGNATURE.match(doc)
    return m.group(1) if m and m.group(1) else "argument"


class ToolProtocol:
    """How a tool env's model calls its tools: the text protocol or the chat template's native tool calling.

    A tool env builds one from its tool table and its ``tool_calling`` option and takes from it what differs
    between the two (the system prompt's section is :func:`protocol_prompt`): the tool schemas its tasks carry
    (``Task.tools``), the stop strings, and, for an oracle or a baseline that reads the conversation, how a
    call is written, how a turn parses and what an observation's result is. Episodes need none: a
    :class:`ToolEpisode` plays a task natively when the task carries tool schemas.

    Args:
        tools: ``{name: one-line doc}``, the doc starting with the signature (``"search(query): ..."``).
        tool_calling: ``"text"`` or ``"native"``.

    Raises:
        ValueError: For another ``tool_calling``.

    """

    def __init__(self, tools: Mapping[str, str], tool_calling: str = "text") -> None:
        check_choice("tool_calling", tool_calling, TOOL_CALLING)
        self.tools = dict(tools)
        self.tool_calling = tool_calling
        self.native = tool_calling == "native"
        self.schemas: list[Schema] | None = tool_schemas(self.tools) if self.native else None
        self.stop_strings = NATIVE_STOP_STRINGS if self.native else STOP_STRINGS

    def call(self, name: str, argument: str) -> str:
        """The assistant turn that calls tool ``name`` with ``argument``."""
        if self.native:
            return native_call(name, {_arg_name(self.tools.get(name, "")): argument})
        return f"<tool>{name}: {argument}</tool>"

    def parse(self, text: str) -> Action:
        """Parse one assistant turn (calling a tool not in the table is :class:`Malformed`); never raises."""
        return parse_tool_call(text, self.schemas) if self.native else parse_action(text, self.tools)

    def result(self, observation: str) -> str | None:
        """The tool result an env observation carries, or None for an error."""
        if self.native:
            return None if observation.startswith("<error>") else observation
        if observation.startswith("<result>"):
            return observation.removeprefix("<result>").removesuffix("</result>")
        return None


class ToolEnv(Env):
    """Base of a tool-using env: its :class:`ToolProtocol` (``self.protocol``) and its stop strings.

    A subclass passes its tool table and its ``tool_calling`` option up and takes the rest from
    ``self.protocol`` (tool schemas for ``Task.tools``, how to write and parse a call); its ``episode``
    returns a :class:`ToolEpisode` running its tools. Its ``max_new_tokens`` is for the text protocol; with
    native tool calling ``native_call_tokens`` more per turn.

    Args:
        tools: ``{name: one-line doc}``, as :class:`ToolProtocol` takes it.
        tool_calling: ``"text"`` or ``"native"``.
        **options: The subclass's unknown options (named by :class:`Env`).

    """

    stop_strings = STOP_STRINGS
    native_call_tokens = 32  # what a native call's JSON wrapper adds to a turn (<tool_call>{"name": ...})

    def __init__(self, tools: Mapping[str, str], tool_calling: str = "text", **options: Any) -> None:
        super().__init__(**options)
        self.protocol = ToolProtocol(tools, tool_calling)
        self.stop_strings = self.protocol.stop_strings
        if self.protocol.native:
            self.max_new_tokens = type(self).max_new_tokens + self.native_call_tokens


class ToolEpisode(Episode):
    """One rollout of a tool-using workflow: runs the model's calls on this episode's own tools.

    The task says how the model calls them: natively where it carries tool schemas (``Task.tools``; the result
    comes back as it is, for a ``tool`` message), else by the text protocol (``<result>...</result>``).
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
        self.native = task.tools is not None
        self.judge = judge
        self.max_result_chars = max_result_chars
        self.calls: list[ToolCall] = []
        self.errors = 0
        self.outcome = self.unfinished_outcome()

    def unfinished_outcome(self) -> dict[str, Any]:
        """The verdict while no answer has been given (and after a turn or token limit ends the episode)."""
        return {"correct": False, "answered": False}

    def step(self, action: str) -> Step:
        """Run one turn: a call gets its result (or ``<error>``), an answer ends the episode."""
        self.actions.append(action)
        parsed = parse_tool_call(action, self.task.tools) if self.native else parse_action(action, self.tools)
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
        return Step(observation=result if self.native else f"<result>{result}</result>", done=False)
