"""Token ids under the chat template: prompts, the env's answers between turns, the close of a turn.

Rollouts, the warm start and evaluation all render conversations here, so that the ids sampled from, the ids
trained on and the ids demonstrated are laid out by one set of rules (see :mod:`rltk.rollout` for how a
multi-turn rollout assembles them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

from rltk.env import Message


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template (plus the generation prompt by default)."""
    out = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if isinstance(out, Mapping):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return [int(t) for t in out]


def observation_ids(
    tokenizer: PreTrainedTokenizerBase, history: Sequence[Message], observation: str
) -> list[int]:
    """Tokens an env observation adds to a conversation (for multi-turn rollouts; loss_mask 0).

    ``template(history + [user: observation], generation prompt) - template(history)``, where ``history`` ends
    with the assistant turn.

    Raises:
        ValueError: If the template does not render ``history`` as a prefix of the longer conversation.

    """
    before = render_prompt(tokenizer, history, add_generation_prompt=False)
    after = render_prompt(tokenizer, [*history, {"role": "user", "content": observation}])
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
) -> list[int]:
    """Every token between an assistant turn's last token and the next turn's first (loss_mask 0).

    The rest of the turn's close (all of ``close_ids`` where the model did not write the end-of-turn token
    itself: a turn cut at a stop string or a length limit), then :func:`observation_ids`. Multi-turn rollouts
    and warm-start demonstrations both lay out env answers with this.

    Args:
        tokenizer: The tokenizer with the chat template.
        history: The conversation, ending with the assistant turn just taken.
        observation: The env's answer, rendered as a ``user`` turn.
        close_ids: :func:`turn_close_ids`.
        closed: Whether the turn's ids already end with the end-of-turn token.

    """
    return [*close_ids[1 if closed else 0 :], *observation_ids(tokenizer, history, observation)]
