"""Native tool calling (tool env option ``tool_calling="native"``): tool schemas rendered by the chat
template, Hermes/Qwen ``<tool_call>`` calls, observations as ``tool`` turns; the text protocol stays the
default.

SmolLM2's ChatML template has no tool support, so these tests give its tokenizer a compact Qwen2.5-style
template that does (:data:`TOOL_TEMPLATE`).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_model
from rltk_envs.doc_search_qa import DocSearchQAEnv
from rltk_envs.sql_analytics import SqlAnalyticsEnv
from rltk_envs.support_refund import SupportRefundEnv
from transformers import PreTrainedTokenizerBase

from rltk import forward
from rltk.batch import collate
from rltk.chat import observation_ids, render_prompt
from rltk.env import Env, Message, Task, run_policy
from rltk.errors import user_errors
from rltk.evaluate import evaluate_policy
from rltk.reward import Rubric
from rltk.rollout import generate
from rltk.tools import (
    NATIVE_STOP_STRINGS,
    STOP_STRINGS,
    FinalAnswer,
    Malformed,
    ToolCall,
    ToolProtocol,
    parse_tool_call,
    tool_schemas,
)
from rltk.warmstart import demonstration_group

# Qwen2.5's template, cut down: tools in the system turn, assistant tool calls, tool results as user turns.
TOOL_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}{%- if call.function %}{%- set call = call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' + (call.arguments | tojson) '
    "+ '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ENVS = {
    "support_refund": lambda **o: SupportRefundEnv(difficulty="hard", **o),
    "sql_analytics": lambda **o: SqlAnalyticsEnv(**o),
    "doc_search_qa": lambda **o: DocSearchQAEnv(difficulty="hard", **o),
}


@pytest.fixture(scope="module")
def tool_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer with a chat template that supports tools (a copy: the fixture keeps its own)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


@pytest.fixture(scope="module", params=sorted(ENVS))
def env(request: pytest.FixtureRequest) -> Env:
    return ENVS[request.param](tool_calling="native")


def play(env: Env, task: Task, policy=None) -> list[Message]:
    """The whole conversation of one episode of ``policy`` (default: the oracle), env answers included."""
    messages: list[Message] = []
    run_policy(env, task, policy or env.oracle, transcript=messages)
    return messages


SCHEMAS = tool_schemas({"lookup_order": "lookup_order(order_id): the order", "add": "add(n): add n"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "K-9180"}}\n</tool_call>',
            "K-9180",
        ),
        (
            'I check. <tool_call>{"name": "lookup_order", "arguments": {"order_id": " K-1 "}}</tool_call>',
            "K-1",
        ),
        ('<tool_call>{"name": "add", "arguments": {"n": 5}}</tool_call>', "5"),  # a number, written as read
        ("<answer> refund </answer>", FinalAnswer("refund")),
        ("", "empty turn"),
        ("I would refund it.", "no action"),
        ("<tool>lookup_order: K-1</tool>", "no action"),  # the text protocol is not a native call
        ('<tool_call>{"name": "add", "arguments": {"n": "1"}}', "unclosed tag"),  # hit its token limit
        ('<tool_call>{"name": "add", "arguments": {"n": "1"}}</tool_call><answer>1</answer>', "one action"),
        ("<tool_call>{name: add}</tool_call>", "bad JSON"),
        ("<tool_call>" + "[" * 100_000 + "</tool_call>", "bad JSON"),  # too deep for the parser
        ('<tool_call>["add", "1"]</tool_call>', '"name"'),
        ('<tool_call>{"arguments": {"n": "1"}}</tool_call>', '"name"'),
        ('<tool_call>{"name": "add", "arguments": "n=1"}</tool_call>', '"arguments" object'),
        ('<tool_call>{"name": "drop_table", "arguments": {}}</tool_call>', "unknown tool 'drop_table'"),
        (
            '<tool_call>{"name": "add", "arguments": {"n": "1", "m": "2"}}</tool_call>',
            "unexpected argument 'm'",
        ),
        ('<tool_call>{"name": "add", "arguments": {}}</tool_call>', "missing argument 'n'"),
        ('<tool_call>{"name": "add", "arguments": {"n": ["1"]}}</tool_call>', "must be a string"),
        ('<tool_call>{"name": "add", "arguments": {"n": true}}</tool_call>', "must be a string"),
    ],
)
def test_parse_tool_call(text: str, expected: str | FinalAnswer) -> None:
    parsed = parse_tool_call(text, SCHEMAS)
    if isinstance(expected, FinalAnswer):
        assert parsed == expected
    elif isinstance(parsed, ToolCall):
        assert parsed.argument == expected
    else:
        assert isinstance(parsed, Malformed) and expected in parsed.error, parsed
        assert "tool_call>" in parsed.error or "tools: add, lookup_order" in parsed.error  # what to write


def test_wrong_arguments_say_what_to_write() -> None:
    error = parse_tool_call('<tool_call>{"name": "add", "arguments": {"x": "1"}}</tool_call>', SCHEMAS).error
    assert error == (
        "unexpected argument 'x', missing argument 'n': write "
        '<tool_call>\n{"name": "add", "arguments": {"n": "..."}}\n</tool_call>'
    )
    # without schemas any name parses, with at most one argument
    assert parse_tool_call('<tool_call>{"name": "x", "arguments": {}}</tool_call>') == ToolCall("x", "")
    assert isinstance(
        parse_tool_call('<tool_call>{"name": "x", "arguments": {"a": 1, "b": 2}}</tool_call>'), Malformed
    )


def test_protocol_schemas_and_calls() -> None:
    protocol = ToolProtocol(
        {"read": "read(doc_id): the text of one document", "ping": "ping: no argument"}, "native"
    )
    assert protocol.schemas == [
        {
            "type": "function",
            "function": {
                "name": "read",
                "description": "the text of one document",
                "parameters": {
                    "type": "object",
                    "properties": {"doc_id": {"type": "string"}},
                    "required": ["doc_id"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "ping",
                "description": "ping: no argument",
                "parameters": {
                    "type": "object",
                    "properties": {"argument": {"type": "string"}},
                    "required": ["argument"],
                },
            },
        },
    ]
    assert protocol.stop_strings == NATIVE_STOP_STRINGS == ("</tool_call>", "</answer>")
    call = protocol.call("read", "D07")
    assert call == '<tool_call>\n{"name": "read", "arguments": {"doc_id": "D07"}}\n</tool_call>'
    assert protocol.parse(call) == ToolCall("read", "D07")
    assert protocol.result("the text") == "the text" and protocol.result("<error>no</error>") is None
    text = ToolProtocol({"read": "read(doc_id): the text of one document"})
    assert text.schemas is None and text.stop_strings == STOP_STRINGS
    assert text.call("read", "D07") == "<tool>read: D07</tool>" and text.result("<result>x</result>") == "x"
    with pytest.raises(ValueError, match="tool_calling must be one of"):
        ToolProtocol({}, "json")


def test_oracle_scores_100_percent_natively(env: Env) -> None:
    tasks = env.tasks("eval", 50)
    result = evaluate_policy(env, Rubric.from_config([], env), tasks, env.oracle, "oracle")
    assert result.accuracy == 1.0 and result.mean_reward == 1.0
    assert env.stop_strings == NATIVE_STOP_STRINGS
    for task in tasks[:10]:
        assert task.tools == env.protocol.schemas and task.observation_role == "tool"
        system = task.messages[0]["content"]
        assert "<tool>" not in system and "<answer>" in system and "one tool per turn" in system
        messages = play(env, task)
        calls = [m["content"] for m in messages[2:-1:2]]
        assert all(c.startswith('<tool_call>\n{"name": ') and c.endswith("}\n</tool_call>") for c in calls)
        assert messages[-1]["content"].startswith("<answer>")
        assert all(m["role"] == "tool" and not m["content"].startswith("<") for m in messages[3::2])


def test_baselines_call_natively(env: Env) -> None:
    for task in env.tasks("eval", 6):
        for name, policy in env.baselines().items():
            actions = [m["content"] for m in play(env, task, policy)[2::2]]
            assert not any("<tool>" in a for a in actions), (name, actions)


def test_prompt_renders_the_tool_schemas(env: Env, tool_tokenizer: PreTrainedTokenizerBase) -> None:
    task = env.tasks("eval", 1)[0]
    text = tool_tokenizer.decode(render_prompt(tool_tokenizer, task.messages, tools=task.tools))
    assert text.startswith("<|im_start|>system\n" + task.messages[0]["content"] + "\n\n# Tools")
    for schema in task.tools:
        assert json.dumps(schema, ensure_ascii=False) in text
    assert text.endswith("<|im_start|>assistant\n")


def test_warm_start_demonstration_is_the_chat_template(
    env: Env, tool_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Prompt + demonstration = the template of the oracle's conversation (tool turns), token for token."""
    task = next(t for t in env.tasks("train", 20) if len(play(env, t)) >= 5)  # a call or more
    group = demonstration_group(tool_tokenizer, env, task)
    rollout = group.rollouts[0]
    messages = play(env, task)
    assert rollout.turns == [m["content"] for m in messages[2::2]]
    full = render_prompt(tool_tokenizer, messages, add_generation_prompt=False, tools=task.tools)
    seq = group.prompt_ids.tolist() + rollout.token_ids.tolist()
    assert full[: len(seq)] == seq and tool_tokenizer.decode(full[len(seq) :]) == "\n"
    assert "<|im_start|>user\n<tool_response>\n" in tool_tokenizer.decode(seq)
    mask = rollout.loss_mask.tolist()
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert len(ends) == len(rollout.turns)
    assert all(rollout.token_ids[i] == tool_tokenizer.eos_token_id for i in ends)


def test_two_turn_rollout_masks_the_env_tokens(tool_tokenizer: PreTrainedTokenizerBase) -> None:
    model = make_tiny_model(tool_tokenizer)
    env = SupportRefundEnv(tool_calling="native")
    tasks = env.tasks("train", 2)
    groups = generate(model, tool_tokenizer, env, tasks, group_size=2, max_new_tokens=6, max_turns=2, seed=0)
    for group in groups:
        prompt = tool_tokenizer.decode(group.prompt_ids.tolist())
        assert "<tools>" in prompt and '"name": "lookup_order"' in prompt
        for r in group.rollouts:
            assert len(r.turns) == 2 and r.stop_reason == "max_turns"  # a random model never answers
            ids, mask = r.token_ids.tolist(), r.loss_mask.tolist()
            env_ids = [t for t, m in zip(ids, mask, strict=True) if m == 0]
            first_env = mask.index(0)
            assert all(m == 1 for m in mask[:first_env]) and all(
                m == 1 for m in mask[first_env + len(env_ids) :]
            )
            text = tool_tokenizer.decode(env_ids)
            assert "<|im_start|>user\n<tool_response>\n<error>" in text, text
            assert text.endswith("\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
            assert (r.sample_logp[r.loss_mask == 0] == 0).all()
    batch = collate(groups, tool_tokenizer.pad_token_id)
    with torch.no_grad():
        logp = forward.completion_logprobs(model, batch, temperature=1.0, mode="off")
    assert (logp - batch.sample_logp)[batch.loss_mask.bool()].abs().max().item() < 1e-5  # on-policy


def test_observation_ids_with_the_tool_role(tool_tokenizer: PreTrainedTokenizerBase) -> None:
    tools = tool_schemas({"add": "add(n): add n"})
    history = [
        {"role": "user", "content": "Add 2"},
        {"role": "assistant", "content": "<tool_call>x</tool_call>"},
    ]
    obs = observation_ids(tool_tokenizer, history, "2", role="tool", tools=tools)
    assert (
        tool_tokenizer.decode(obs)
        == "<|im_start|>user\n<tool_response>\n2\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_template_without_tools_is_refused(tokenizer: PreTrainedTokenizerBase, tiny_model) -> None:
    env = SupportRefundEnv(tool_calling="native")
    task = env.tasks("eval", 1)[0]
    fix = r"does not render tools.*env\.options\.tool_calling=text.*chat template supports tools"
    with pytest.raises(ValueError, match=fix) as exc:
        render_prompt(tokenizer, task.messages, tools=task.tools)
    assert "smollm2" in str(exc.value) and isinstance(exc.value, user_errors())  # the CLI prints it plainly
    with pytest.raises(ValueError, match=fix):
        generate(tiny_model, tokenizer, env, [task], group_size=1, max_new_tokens=2)
    with pytest.raises(ValueError, match=fix):
        demonstration_group(tokenizer, env, task)


@pytest.mark.parametrize("name", sorted(ENVS))
def test_text_mode_is_the_default(name: str, tokenizer: PreTrainedTokenizerBase) -> None:
    env, text = ENVS[name](), ENVS[name](tool_calling="text")
    assert env.tasks("eval", 5) == text.tasks("eval", 5)
    task = env.tasks("eval", 1)[0]
    assert task.tools is None and task.observation_role == "user" and env.stop_strings == STOP_STRINGS
    assert "<tool>" in task.messages[0]["content"]
    messages = play(env, task)
    assert messages[2]["content"].startswith("<tool>") or messages[2]["content"].startswith("<answer>")
    assert all(m["role"] == "user" for m in messages[3::2])
    assert render_prompt(tokenizer, task.messages) == render_prompt(tokenizer, task.messages, tools=None)
