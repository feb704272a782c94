"""Stage "export", its proof: the export plays the env's tasks as the checkpoint does, outside rltk.

    rltk (parent)                                     python -I rltk/export_child.py DIR (no rltk, no peft)
    env.episode ─ prompt/history ids ─▶ ChildSampler ──▶  export's greedy tokens
                ◀─ the export's tokens ─┘   └─ teacher-forced on the unmerged checkpoint: same argmax?

The parent drives every episode through rltk's rollout engine (multi-turn envs included: it renders each
turn's context and applies the env's answer) with :class:`ChildSampler` as the sampler, so the export's
answers are judged by the env and scored by the run's rubric exactly as in training. For every generated
token the unmerged checkpoint's next-token argmax is computed under teacher forcing on the export's own
tokens, so one near-tie cannot cascade into a false failure. A differing argmax is a *mismatch* unless the
reference's top-2 logit gap there is below :data:`NEAR_TIE` (a merged and an unmerged LoRA differ by ~1e-6):
those are counted as near ties, and their episodes are replayed by the reference to compare rewards.
The child also renders every task's first prompt with the export's own chat template (a serving stack
renders chats itself) and reports what loading found (missing, unexpected or mismatched keys, ``auto_map``,
end-of-turn ids).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rltk.batch import Rollout
from rltk.chat import render_prompt
from rltk.env import Env, Task
from rltk.evaluate import model_rollouts
from rltk.export_sums import ExportError
from rltk.models import context_length
from rltk.progress import Progress
from rltk.reward import Rubric
from rltk.sampler import SamplerLimits, SamplingParams, TurnSample, cut_turn, eos_token_ids

CHILD = Path(__file__).with_name("export_child.py")
NEAR_TIE = 1e-4  # top-2 logit gap below which a differing argmax is a tie, not a wrong merge
SHOWN = 5  # divergences quoted in a failure message


@dataclass(frozen=True)
class Divergence:
    """A generated token where the export's choice is not the reference's argmax."""

    task_id: str
    turn: int  # assistant turn of the episode, from 0
    position: int  # token index within the turn
    export_token: int
    reference_token: int
    gap: float  # the reference's top-1 minus top-2 logit there


@dataclass
class VerifyReport:
    """What :func:`verify_export` compared and found."""

    export_dir: str
    kind: str  # "merged" | "adapter"
    env: str
    tasks: int
    turns: int = 0  # assistant turns the export generated
    tokens: int = 0  # generated tokens compared under teacher forcing
    near_ties: list[Divergence] = field(default_factory=list)
    mismatches: list[Divergence] = field(default_factory=list)
    template_mismatches: list[str] = field(default_factory=list)  # task ids rendered differently
    loading_problems: list[str] = field(default_factory=list)
    reward_differences: list[str] = field(default_factory=list)  # "task: export r1, reference r2"
    export_reward: float = math.nan
    reference_reward: float = math.nan
    export_accuracy: float = math.nan
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when nothing differs but near ties."""
        return not (
            self.mismatches or self.template_mismatches or self.loading_problems or self.reward_differences
        )

    def summary(self) -> str:
        """One paragraph: the verdict and the counts."""
        verdict = "verified" if self.ok else "FAILED"
        return (
            f"{verdict}: {self.kind} export on {self.tasks} {self.env} tasks ({self.turns} turns, "
            f"{self.tokens} tokens under teacher forcing) in {self.seconds:.0f} s; argmax mismatches "
            f"{len(self.mismatches)}, near ties (gap < {NEAR_TIE:g}) {len(self.near_ties)}, chat-template "
            f"differences {len(self.template_mismatches)}, reward differences "
            f"{len(self.reward_differences)}; mean reward export {self.export_reward:.4f} vs checkpoint "
            f"{self.reference_reward:.4f}, accuracy {100 * self.export_accuracy:.1f}%"
        )

    def problems(self) -> list[str]:
        """Each failure, quoted (a few of each kind)."""
        out = list(self.loading_problems)
        out += [
            f"{d.task_id} turn {d.turn} token {d.position}: export {d.export_token}, checkpoint argmax "
            f"{d.reference_token} (gap {d.gap:.3g})"
            for d in self.mismatches[:SHOWN]
        ]
        out += [
            f"{t}: the export's chat template renders another prompt"
            for t in self.template_mismatches[:SHOWN]
        ]
        out += self.reward_differences[:SHOWN]
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the near ties and mismatches as lists of dicts)."""
        return {**asdict(self), "ok": self.ok, "near_tie_gap": NEAR_TIE}


class ExportChild:
    """The child process (module docstring): started on enter, stdin closed and waited on exit."""

    def __init__(self, export_dir: Path, kind: str, python: str | None = None) -> None:
        self.export_dir, self.kind = export_dir, kind
        self._log: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115  # closed in __exit__
        self._proc = subprocess.Popen(
            [python or sys.executable, "-I", str(CHILD), str(export_dir), kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.ready: dict[str, Any] = self._read()["ready"]

    def __enter__(self) -> ExportChild:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.stdin:
            # Said, not only closed: a process forked since (a reward worker) keeps the pipe open: no EOF.
            with contextlib.suppress(OSError):
                self._proc.stdin.write('{"quit": true}\n')
                self._proc.stdin.flush()
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._log.close()

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._log.seek(0)
            tail = self._log.read()[-2000:]
            raise ExportError(
                f"the export at {self.export_dir} does not load with plain transformers"
                f"{' and peft' if self.kind == 'adapter' else ''} (rltk refused) in a fresh process:\n{tail}"
            )
        return json.loads(line)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request line, return the answer line."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._read()


class ChildSampler:
    """A greedy :class:`~rltk.sampler.Sampler` whose tokens come from the export, checked token by token.

    Args:
        child: The running export.
        reference: The unmerged checkpoint (fp32, eval mode), teacher-forced on the export's tokens.
        tokenizer: The run's tokenizer (stop strings).
        tasks: The tasks being played, to name a divergence's task (by its first prompt).
        report: Filled in place: turns, tokens, near ties, mismatches.

    Attributes:
        prompts: ``(rendered prompt ids, task id)`` of each task, in order (its template check reads them).

    """

    def __init__(
        self,
        child: ExportChild,
        reference: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        tasks: Sequence[Task],
        report: VerifyReport,
    ) -> None:
        self.child, self.reference, self.tokenizer, self.report = child, reference, tokenizer, report
        eos = eos_token_ids(reference, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        self.limits = SamplerLimits(context_length(reference), tuple(eos), pad)
        self.prompts = [(render_prompt(tokenizer, t.messages, tools=t.tools), t.id) for t in tasks]
        self.progress = Progress(f"export check: {report.kind}, {len(tasks)} {report.env} tasks", len(tasks))
        self._turns: dict[str, int] = {}

    def _task_of(self, ids: list[int]) -> str:
        return next((tid for p, tid in self.prompts if ids[: len(p)] == p), "?")

    def _cut(self, tokens: list[int], params: SamplingParams) -> tuple[list[int], bool]:
        """The turn as the HF sampler would keep it (:func:`rltk.sampler.cut_turn`)."""
        end, finished = cut_turn(tokens, self.limits.eos_ids, self.tokenizer, params.stop_strings)
        return tokens[:end], finished

    @torch.no_grad()
    def _compare(self, ids: list[int], tokens: list[int]) -> None:
        if not tokens:
            return
        task = self._task_of(ids)
        turn = self._turns.get(task, 0)
        self._turns[task] = turn + 1
        if turn == 0:
            self.progress.update(1)
        seq = torch.tensor([ids + tokens], device=self.reference.get_input_embeddings().weight.device)
        logits = self.reference(input_ids=seq).logits[0, len(ids) - 1 : -1].float()  # [T, V]
        top = logits.topk(2, dim=-1)
        gaps = (top.values[:, 0] - top.values[:, 1]).tolist()
        self.report.turns += 1
        self.report.tokens += len(tokens)
        for pos, (mine, ref, gap) in enumerate(zip(tokens, top.indices[:, 0].tolist(), gaps, strict=True)):
            if mine != ref:
                d = Divergence(task, turn, pos, mine, ref, gap)
                (self.report.near_ties if gap < NEAR_TIE else self.report.mismatches).append(d)

    def sample(
        self, prompts: Sequence[torch.Tensor], repeats: int, params: SamplingParams
    ) -> list[TurnSample]:
        """The export's greedy turn for each prompt (see :meth:`rltk.sampler.Sampler.sample`)."""
        if repeats != 1 or params.temperature != 0:
            raise ValueError("the export check plays greedily, one episode per task")
        samples = []
        for prompt in prompts:
            ids = prompt.tolist()
            request = {
                "ids": ids,
                "max_new_tokens": params.max_new_tokens,
                "min_new_tokens": params.min_new_tokens,
                "stop_strings": list(params.stop_strings),
            }
            tokens, finished = self._cut(self.child.ask({"generate": request})["tokens"], params)
            self._compare(ids, tokens)
            t = torch.tensor(tokens, dtype=torch.long)
            samples.append(TurnSample(t, torch.zeros(len(tokens)), finished))
        return samples

    def push_weights(self, model: nn.Module) -> None:
        """An export is fixed."""
        raise ValueError("the export check's sampler plays a fixed export")

    def close(self) -> None:
        """End the progress line (the child is closed by its own context)."""
        self.progress.close()


def _loading_problems(ready: dict[str, Any], eos_ids: Sequence[int], kind: str) -> list[str]:
    problems = [
        f"loading reports {key.replace('_', ' ')}: {', '.join(ready[key][:5])}"
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if ready[key]
    ]
    if ready["auto_map"]:
        problems.append(
            f"config.json has auto_map {ready['auto_map']} (custom code: servers would refuse it)"
        )
    if ready["quantized"]:
        problems.append("config.json carries a quantization_config although the weights are plain")
    if "rltk" in ready["imported"] or (kind == "merged" and "peft" in ready["imported"]):
        problems.append(f"the child could import {ready['imported']} (the check is not isolated)")
    if not set(eos_ids) <= set(ready["eos_ids"]):
        problems.append(
            f"generation_config.json ends turns at {ready['eos_ids']}, the run at {sorted(eos_ids)}: a "
            "server would run past the end of an answer"
        )
    return problems


def _rewards_differ(mine: Rollout, ref: Rollout) -> bool:
    if math.isnan(mine.reward) or math.isnan(ref.reward):
        return math.isnan(mine.reward) != math.isnan(ref.reward)
    return not math.isclose(mine.reward, ref.reward, rel_tol=0, abs_tol=1e-9)


def verify_export(
    export_dir: Path,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    env: Env,
    rubric: Rubric,
    tasks: list[Task],
    max_new_tokens: int,
    kind: str = "merged",
    python: str | None = None,
) -> VerifyReport:
    """Play ``tasks`` with the export in a fresh, isolated process and check it against ``reference``.

    Args:
        export_dir: The export (merged weights, or an adapter: ``kind``).
        reference: The run's unmerged policy in fp32 (what was trained), eval mode.
        tokenizer: The run's tokenizer.
        env: The run's env; ``tasks`` are its eval tasks.
        rubric: The run's rubric (rewards compared per task).
        tasks: Tasks to play greedily, one episode each.
        max_new_tokens: Tokens per assistant turn (the run's eval budget).
        kind: ``"merged"`` (rltk and peft refused in the child) or ``"adapter"`` (rltk refused).
        python: The child's interpreter (default: this one); e.g. a venv with only torch and transformers.

    Returns:
        The report; ``report.ok`` says whether it verified. Raises only if the export does not load.

    """
    t0 = time.perf_counter()
    report = VerifyReport(str(export_dir), kind, env.name, len(tasks))
    with ExportChild(export_dir, kind, python) as child:
        sampler = ChildSampler(child, reference, tokenizer, tasks, report)
        report.loading_problems = _loading_problems(child.ready, sampler.limits.eos_ids, kind)
        for (want, task_id), task in zip(sampler.prompts, tasks, strict=True):
            if child.ask({"render": {"messages": task.messages, "tools": task.tools}})["ids"] != want:
                report.template_mismatches.append(task_id)
        with contextlib.closing(sampler):
            rollouts = model_rollouts(sampler, tokenizer, env, rubric, tasks, max_new_tokens)
    tied = sorted({d.task_id for d in report.near_ties})
    replay = (
        {
            r.task.id: r
            for r in model_rollouts(
                reference, tokenizer, env, rubric, [t for t in tasks if t.id in tied], max_new_tokens
            )
        }
        if tied
        else {}
    )
    ref_rewards = []
    for r in rollouts:
        ref = replay.get(r.task.id, r)  # no near tie: the reference's greedy tokens are the export's
        ref_rewards.append(ref.reward)
        if _rewards_differ(r, ref):
            report.reward_differences.append(
                f"{r.task.id}: export reward {r.reward:.4f}, checkpoint {ref.reward:.4f}"
            )
    report.export_reward = _nanmean([r.reward for r in rollouts])
    report.reference_reward = _nanmean(ref_rewards)
    report.export_accuracy = sum(bool(r.outcome.get("correct")) for r in rollouts) / max(1, len(rollouts))
    report.seconds = time.perf_counter() - t0
    return report


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
