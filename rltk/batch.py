"""The data that moves between stages: ``Rollout`` → ``Group`` → ``Batch``.

These live in their own module (not in rollout.py or advantage.py) because every later stage reads them;
keeping them here avoids import cycles between stages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from rltk.env import Task

FailureKind = Literal["raised", "timeout", "crashed", "invalid"]


@dataclass(frozen=True)
class Failure:
    """Why a rollout could not be scored: a bug in a reward or in the env, not a score.

    A rollout with a failure leaves the update entirely (no policy-gradient, KL or entropy term, not counted
    in the loss normaliser) and its group's baseline; the run stops when failures pass
    ``rollout.max_reward_error_rate`` (:class:`rltk.failures.FailureGuard`).

    Attributes:
        source: The reward's name in the rubric, or ``"env"`` (an episode step or check that raised or hung).
        kind: ``"raised"`` (an exception), ``"timeout"`` (killed at its deadline), ``"crashed"`` (its worker
            process died), ``"invalid"`` (a value that is not a finite real within the declared range).
        detail: What happened, e.g. ``"KeyError('label')"`` or ``"returned 7.0, outside (0.0, 1.0)"``.

    """

    source: str
    kind: FailureKind
    detail: str

    def __str__(self) -> str:
        return f"{self.source}: {self.kind}: {self.detail}"


@dataclass
class Rollout:
    """One sampled attempt at a task.

    Attributes:
        task: The task attempted.
        turns: Assistant text per turn (decoded from the generated ids).
        token_ids: ``[L]`` everything after the prompt, exactly as generated (model tokens) plus the env's
            rendered tokens (multi-turn); no re-tokenization.
        loss_mask: ``[L]`` 1 where the model generated the token, 0 for env tokens.
        sample_logp: ``[L]`` log-prob of each token under the sampling distribution (generation scores,
            after temperature), 0 where ``loss_mask`` is 0. Used for the mismatch metric only.
        outcome: The env's verdict (``Episode.outcome``).
        scores: Per reward name: its score, or ``None`` where the task makes it not applicable.
        reward: The rubric's weighted sum of ``scores``.
        truncated: True if a length or turn limit ended the rollout, or cut its last turn.
        stop_reason: ``"done"`` (the env ended the episode), ``"max_turns"``, ``"max_tokens"`` or
            ``"env_failed"`` (an episode step raised or hung: ``failures`` says which).
        failures: What could not be scored (a reward or the env failed); non-empty = the rollout is left out
            of the update and of its group's baseline, and ``reward`` is NaN.

    """

    task: Task
    turns: list[str]
    token_ids: torch.Tensor  # [L]
    loss_mask: torch.Tensor  # [L]
    sample_logp: torch.Tensor  # [L]
    outcome: Mapping[str, Any] = field(default_factory=dict)  # an rltk.env.Outcome from the engine
    scores: dict[str, float | None] = field(default_factory=dict)
    reward: float = 0.0
    truncated: bool = False
    stop_reason: str = "done"
    failures: list[Failure] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when a reward or the env failed on this rollout (it is left out of the update)."""
        return bool(self.failures)


@dataclass
class Group:
    """G rollouts of one task (group-relative estimators compare them).

    Attributes:
        task: The task.
        prompt_ids: ``[Lp]`` the rendered prompt (chat template + generation prompt), no padding.
        rollouts: The G rollouts.

    """

    task: Task
    prompt_ids: torch.Tensor  # [Lp]
    rollouts: list[Rollout]

    @property
    def rewards(self) -> torch.Tensor:  # [G]
        """The rollouts' rewards as a float32 tensor."""
        return torch.tensor([r.reward for r in self.rollouts], dtype=torch.float32)


@dataclass
class Batch:
    """A micro-batch for the update: P whole groups of G completions sharing P prompts.

    Prompts are left-padded (so the last prompt token sits at column ``Lp - 1``), completions right-padded.
    Row ``i`` of the completion tensors belongs to prompt ``i // group_size``. :func:`collate` fills the
    rollouts' tensors; the experience pass adds ``old_logp``, ``ref_logp`` and ``values``, and the advantage
    stage ``advantages`` and ``returns``.
    """

    prompt_ids: torch.Tensor  # [P, Lp] left-padded
    prompt_mask: torch.Tensor  # [P, Lp] 1 = real token
    completion_ids: torch.Tensor  # [P*G, Lc] right-padded
    completion_mask: torch.Tensor  # [P*G, Lc] 1 = real token (model or env)
    loss_mask: torch.Tensor  # [P*G, Lc] 1 = model-generated token (trained on)
    group_size: int
    rewards: torch.Tensor | None = None  # [P*G] the rubric's reward, NaN = a failed rollout
    answers: list[Any] = field(default_factory=list)  # P*G answer classes (outcome["answer"]), for balancing
    advantages: torch.Tensor | None = None  # [P*G] (sequence-level) or [P*G, Lc] (token-level)
    returns: torch.Tensor | None = None  # [P*G, Lc] value targets (critic)
    old_logp: torch.Tensor | None = None  # [P*G, Lc] policy log-probs before the update (PPO ratio)
    ref_logp: torch.Tensor | None = None  # [P*G, Lc] reference log-probs (KL)
    values: torch.Tensor | None = None  # [P*G, Lc] the critic's values before the update
    sample_logp: torch.Tensor | None = None  # [P*G, Lc] log-probs at sampling time (mismatch metric)
    keep: torch.Tensor | None = None  # [P*G] bool, False = a failed rollout (no loss term, not counted)

    @property
    def num_prompts(self) -> int:
        """P."""
        return self.prompt_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device``."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)


def left_pad(seqs: list[torch.Tensor] | list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token sequences into ``(ids [N, L], mask [N, L])`` so every last token sits in column L-1.

    >>> ids, mask = left_pad([[5, 6], [7]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6], [0, 7]], [[1, 1], [0, 1]])
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [N, L]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [N, L]
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def collate(groups: list[Group], pad_id: int) -> Batch:
    """Pack whole groups into one :class:`Batch`.

    Args:
        groups: Groups of equal size G, each with ``advantages`` set.
        pad_id: Token id used for padding (masked out everywhere).

    Returns:
        The batch; ``rewards``, ``answers``, ``sample_logp`` and ``keep`` are filled from the rollouts, the
        experience and advantage fields are left ``None``. A failed rollout (``rollout.failed``) gets
        ``keep`` False, an all-zero ``loss_mask`` and a NaN reward.

    """
    if not groups:
        raise ValueError("collate needs at least one group")
    g = len(groups[0].rollouts)
    if any(len(gr.rollouts) != g for gr in groups):
        raise ValueError("all groups in a batch must have the same number of rollouts")
    rollouts = [r for gr in groups for r in gr.rollouts]
    lc = max(1, max(len(r.token_ids) for r in rollouts))
    n = len(rollouts)
    prompt_ids, prompt_mask = left_pad([gr.prompt_ids for gr in groups], pad_id)  # [P, Lp]
    completion_ids = torch.full((n, lc), pad_id, dtype=torch.long)  # [P*G, Lc]
    completion_mask = torch.zeros((n, lc), dtype=torch.long)  # [P*G, Lc]
    loss_mask = torch.zeros((n, lc), dtype=torch.float32)  # [P*G, Lc]
    sample_logp = torch.zeros((n, lc), dtype=torch.float32)  # [P*G, Lc]
    for j, r in enumerate(rollouts):
        k = len(r.token_ids)
        completion_ids[j, :k] = r.token_ids
        completion_mask[j, :k] = 1
        if not r.failed:
            loss_mask[j, :k] = r.loss_mask.float()
        sample_logp[j, :k] = r.sample_logp.float()
    return Batch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        loss_mask=loss_mask,
        group_size=g,
        rewards=torch.tensor([math.nan if r.failed else r.reward for r in rollouts], dtype=torch.float32),
        answers=[r.outcome.get("answer") for r in rollouts],
        sample_logp=sample_logp,
        keep=torch.tensor([not r.failed for r in rollouts], dtype=torch.bool),  # [P*G]
    )


_ROW_FIELDS = (
    "completion_ids",
    "completion_mask",
    "loss_mask",
    "rewards",
    "advantages",
    "returns",
    "old_logp",
    "ref_logp",
    "values",
    "sample_logp",
    "keep",
)


def split_rows(batch: Batch, rows: int) -> list[Batch]:
    """``batch`` as micro-batches of ``rows`` completions of one prompt each, padding trimmed.

    For long episodes: the update's activations grow with the rows of a micro-batch, and a whole group may
    not fit. Every per-row field (advantages, returns, old and reference log-probs...) is sliced alike, so the
    pieces' losses, over the same global normaliser, sum to the whole batch's. Each piece is a "group" of
    ``rows`` (``group_size = rows``) with its prompt, so every prompt layout still applies (under
    ``shared_prompt=kv`` the prompt's forward then runs once per piece).

    >>> seqs = ([1, 2, 3], [4])
    >>> rollouts = [Rollout(None, [], torch.tensor(s), torch.ones(len(s)), torch.zeros(len(s))) for s in seqs]
    >>> b = collate([Group(None, torch.tensor([5, 6]), rollouts)], pad_id=0)
    >>> [(p.completion_ids.tolist(), p.group_size) for p in split_rows(b, 1)]
    [([[1, 2, 3]], 1), ([[4]], 1)]

    Raises:
        ValueError: If ``rows`` does not divide the batch's group size.

    """
    g = batch.group_size
    if rows <= 0 or g % rows:
        raise ValueError(f"rows per micro-batch ({rows}) must divide the group size ({g})")
    if rows == g:
        return [batch]
    pieces = []
    for start in range(0, batch.completion_ids.shape[0], rows):
        p, span = start // g, slice(start, start + rows)
        width = max(1, int(batch.completion_mask[span].sum(-1).max()))  # right padding past it is dropped
        left = int((batch.prompt_mask[p].cumsum(0) == 0).sum())  # left padding of this prompt
        cut = {}
        for name in _ROW_FIELDS:
            value = getattr(batch, name)
            if value is not None:
                cut[name] = value[span, :width] if value.dim() == 2 else value[span]
        pieces.append(
            replace(
                batch,
                prompt_ids=batch.prompt_ids[p : p + 1, left:],
                prompt_mask=batch.prompt_mask[p : p + 1, left:],
                group_size=rows,
                answers=batch.answers[span],
                **cut,
            )
        )
    return pieces
