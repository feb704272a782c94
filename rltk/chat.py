"""Token ids under the chat template: prompts, the env's answers between turns, the close of a turn.

Rollouts, the warm start and evaluation all render conversations here, so that the ids sampled from, the ids
trained on and the ids demonstrated are laid out by one set of rules (see :mod:`rltk.rollout` for how a
multi-turn rollout assembles them). A task's tool schemas (``Task.tools``, native tool calling) go with every
rendering of its conversation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from rltk.env import Message


class ToolTemplateError(ValueError):
    """Tasks with native tools met a chat template that does not render tools (the message names the fix)."""


_RENDERS_TOOLS: dict[str, bool] = {}  # chat template → whether it renders the tools it is given
_PROBE = {
    "type": "function",
    "function": {
        "name": "rltk_probe_tool",
        "description": "Checks that the chat template renders tools.",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]},
    },
}


def render_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template (plus the generation prompt by default).

    Args:
        tokenizer: The tokenizer with the chat template.
        messages: The conversation.
        add_generation_prompt: Whether to end with the template's opening of an assistant turn.
        tools: Tool schemas for the template to render (``Task.tools``); ``None``: none.

    Raises:
        ToolTemplateError: If ``tools`` are given and the chat template does not render tools.

    """
    if tools is not None:
        check_renders_tools(tokenizer)
    out = tokenizer.apply_chat_template(
        list(messages),
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        **({"tools": list(tools)} if tools is not None else {}),
    )
    if isinstance(out, Mapping):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(t) for t in out]


def check_renders_tools(tokenizer: PreTrainedTokenizerBase) -> None:
    """Check (once per chat template) that the template renders tools: a one-tool conversation names the tool.

    Raises:
        ToolTemplateError: Naming the model and the fix, if the tool's name does not appear in the text.

    """
    key = str(tokenizer.chat_template)
    if key not in _RENDERS_TOOLS:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi"}], tools=[_PROBE], tokenize=False
            )
        except Exception:  # a template that fails on tools does not support them either
            text = ""
        _RENDERS_TOOLS[key] = _PROBE["function"]["name"] in str(text)
    if not _RENDERS_TOOLS[key]:
        raise ToolTemplateError(
            f"the chat template of {tokenizer.name_or_path!r} does not render tools, so the env cannot use "
            "native tool calling with it; set env.options.tool_calling=text (the plain-text tool protocol), "
            "or use a model whose tokenizer's chat template supports tools (e.g. Qwen2.5's)"
        )


def observation_ids(
    tokenizer: PreTrainedTokenizerBase,
    history: Sequence[Message],
    observation: str,
    role: str = "user",
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Tokens an env observation adds to a conversation (for multi-turn rollouts; loss_mask 0).

    ``template(history + [role: observation], generation prompt) - template(history)``, where ``history`` ends
    with the assistant turn; ``role`` is ``user``, or ``tool`` with native tools (``Task.observation_role``),
    and ``tools`` the task's tool schemas.

    Raises:
        ValueError: If the template does not render ``history`` as a prefix of the longer conversation.

    """
    before = render_prompt(tokenizer, history, add_generation_prompt=False, tools=tools)
    after = render_prompt(tokenizer, [*history, {"role": role, "content": observation}], tools=tools)
    if after[: len(before)] != before:
        raise ValueError("the chat template does not render the history as a prefix of the next turn")
    return after[len(before) :]


def turn_close_ids(tokenizer: PreTrainedTokenizerBase, eos_ids: Sequence[int]) -> list[int]:
    """The tokens the chat template puts after an assistant turn's text, starting with its end-of-turn id.

    Found by rendering a two-message conversation with and without the assistant's reply.

    Raises:
        ValueError: If the template does not end an assistant turn with one of ``eos_ids``.

    """
    user = [{"role": "user", "content": "Hi"}]
    head = render_prompt(tokenizer, user)
    full = render_prompt(
        tokenizer, [*user, {"role": "assistant", "content": "Hello"}], add_generation_prompt=False
    )
    rest = full[len(head) :] if full[: len(head)] == head else []
    ends = [i for i, t in enumerate(rest) if t in set(eos_ids)]
    if not ends:
        raise ValueError(
            "the chat template does not close an assistant turn with an EOS token, so a multi-turn rollout "
            "cannot tell where a turn ends; use a tokenizer whose template does (e.g. ChatML), or set its "
            "generation_config.eos_token_id to the template's end-of-turn token"
        )
    return rest[ends[0] :]


def env_answer_ids(
    tokenizer: PreTrainedTokenizerBase,
    history: Sequence[Message],
    observation: str,
    close_ids: Sequence[int],
    closed: bool,
    role: str = "user",
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Every token between an assistant turn's last token and the next turn's first (loss_mask 0).

    The rest of the turn's close (all of ``close_ids`` where the model did not write the end-of-turn token
    itself: a turn cut at a stop string or a length limit), then :func:`observation_ids`. Multi-turn rollouts
    and warm-start demonstrations both lay out env answers with this.

    Args:
        tokenizer: The tokenizer with the chat template.
        history: The conversation, ending with the assistant turn just taken.
        observation: The env's answer, rendered as a ``role`` turn.
        close_ids: :func:`turn_close_ids`.
        closed: Whether the turn's ids already end with the end-of-turn token.
        role: The observation's role: ``user``, or ``tool`` with native tools (``Task.observation_role``).
        tools: The task's tool schemas (``Task.tools``), rendered with the conversation.

    """
    return [*close_ids[1 if closed else 0 :], *observation_ids(tokenizer, history, observation, role, tools)]
