"""The GGUF check: a :class:`~rltk.sampler.Sampler` on llama.cpp, and :func:`verify_gguf`.

    out.gguf ──LlamaCppSampler (token ids in, token ids out)──▶ rltk.evaluate.model_rollouts ──▶ verify_gguf

:class:`LlamaCppSampler` runs a GGUF file with llama-cpp-python behind rltk's sampler seam, so the rollout
engine plays an env's tasks (multi-turn included) under llama.cpp exactly as it does under transformers;
:func:`verify_gguf` compares the two on a run's eval tasks. Writing the file is :mod:`rltk.gguf`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from rltk.gguf import END_KEYS, GgufError, require_llama_cpp
from rltk.sampler import SamplerLimits, SamplingParams, TurnSample, stop_string_end

if TYPE_CHECKING:
    from rltk.batch import Rollout
    from rltk.config import Config

TOLERANCE_POINTS = 2.0
KV_CACHE_TYPES = {"f16": "GGML_TYPE_F16", "f32": "GGML_TYPE_F32"}  # llama_cpp's names of ggml types


def _gguf_end_ids(metadata: dict[str, str]) -> set[int]:
    """EOS/EOT ids named in a GGUF's metadata (llama-cpp-python gives values as strings)."""
    return {int(metadata[k]) for k in END_KEYS if k in metadata}


def _pick(logits: torch.Tensor, params: SamplingParams) -> tuple[int, float]:
    """One token from ``[V]`` logits as transformers samples it: temperature, then top-k, then top-p.

    Returns the token and its log-prob under the processed distribution (greedy: the plain log-softmax).
    Random draws come from torch's global RNG, as the protocol asks.
    """
    if params.temperature == 0:
        token = int(logits.argmax())
        return token, float(logits.log_softmax(-1)[token])
    scores = logits / params.temperature
    if params.top_k > 0:
        kth = scores.topk(min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        # transformers' TopPLogitsWarper: drop the low tail whose mass is at most 1 - top_p, keep >= 1 token
        ordered, order = scores.sort()
        tail = ordered.softmax(-1).cumsum(-1) <= 1 - params.top_p
        tail[-1] = False
        scores = scores.masked_fill(tail.scatter(0, order, tail), float("-inf"))
    logp = scores.log_softmax(-1)
    token = int(torch.multinomial(logp.exp(), 1))
    return token, float(logp[token])


class LlamaCppSampler:
    """A :class:`~rltk.sampler.Sampler` that runs a GGUF file with llama.cpp (llama-cpp-python).

    Prompts go in as token ids (``Llama.eval``; never decoded and re-tokenized) and each continuation is
    decoded token by token from the last position's logits, sampled as :class:`~rltk.sampler.HFSampler`
    samples (greedy at ``temperature == 0``; min-new-tokens EOS suppression, temperature, top-k, top-p) and
    cut the same way: after the first EOS id (kept) or after the token that completes a stop string
    (:func:`~rltk.sampler.stop_string_end`). The KV cache is reused across calls for the longest common
    prefix (the G repeats of a prompt, prompts sharing a system prompt). EOS ids: the tokenizer's and those
    the GGUF names (``eos``/``eot``), as HFSampler takes the tokenizer's and the generation config's.

    Args:
        gguf_file: The model.
        tokenizer: The export's tokenizer (EOS/pad ids, stop strings).
        n_ctx: Context length (0: the model's own).
        n_threads: CPU threads, for decoding and for prompts alike. The default is 1: on a busy 2-core CPU
            two ggml threads took 7.9 s for 60 prompt tokens of SmolLM2-135M, one took 0.3 s (ggml's
            threads meet at a barrier after every op, and a preempted one stalls the other);
            llama-cpp-python's own default runs prompts on every core.
        kv_cache: ``f16`` (llama.cpp's default, what a llama.cpp server runs) or ``f32``. An f32 GGUF
            computes transformers' fp32 logits up to rounding only with an f32 cache: the f16 cache moves
            them by about 1e-3, enough to flip a near tie in greedy decoding (measured on the tiny model).

    """

    def __init__(
        self,
        gguf_file: Path,
        tokenizer: PreTrainedTokenizerBase,
        n_ctx: int = 0,
        n_threads: int = 1,
        kv_cache: str = "f16",
    ) -> None:
        self._lib = require_llama_cpp()
        if kv_cache not in KV_CACHE_TYPES:
            raise GgufError(f"kv_cache {kv_cache!r} is not one of {', '.join(KV_CACHE_TYPES)}")
        ggml_type = getattr(self._lib, KV_CACHE_TYPES[kv_cache])
        self.llm: Any = self._lib.Llama(
            model_path=str(gguf_file),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            type_k=ggml_type,
            type_v=ggml_type,
            verbose=False,
        )
        self.tokenizer = tokenizer
        eos = {tokenizer.eos_token_id, *_gguf_end_ids(self.llm.metadata)} - {None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
        self.limits = SamplerLimits(int(self.llm.n_ctx()), tuple(sorted(eos)), int(pad))
        self._closed = False

    def _prefill(self, ids: list[int]) -> None:
        """Bring the KV cache to ``ids``: keep the longest cached prefix, evaluate the rest (>= 1 token)."""
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens].tolist()
        keep = 0
        for a, b in zip(cached, ids[:-1], strict=False):  # the last token always runs: its logits are needed
            if a != b:
                break
            keep += 1
        memory = self._lib.llama_get_memory(llm.ctx)
        if keep == 0 or not self._lib.llama_memory_seq_rm(memory, 0, keep, -1):
            keep = 0
            llm.reset()
        llm.n_tokens = keep
        llm.eval(ids[keep:])

    def _logits(self) -> torch.Tensor:
        """``[V]`` fp32 logits of the last evaluated position."""
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy())

    def _turn(self, prompt: list[int], params: SamplingParams) -> TurnSample:
        """One continuation of ``prompt`` (see the class docstring)."""
        self._prefill(prompt)
        eos = list(self.limits.eos_ids)
        room = self.limits.context_length - len(prompt)
        ids: list[int] = []
        logps: list[float] = []
        finished = False
        for _ in range(min(params.max_new_tokens, room)):
            logits = self._logits()
            if len(ids) < params.min_new_tokens:
                logits[eos] = float("-inf")
            token, logp = _pick(logits, params)
            ids.append(token)
            logps.append(logp)
            if token in eos:
                finished = True
                break
            if params.stop_strings and (end := stop_string_end(ids, self.tokenizer, params.stop_strings)):
                ids, logps, finished = ids[:end], logps[:end], True
                break
            self.llm.eval([token])
        return TurnSample(torch.tensor(ids, dtype=torch.long), torch.tensor(logps), finished)

    def sample(
        self, prompts: Sequence[torch.Tensor], repeats: int, params: SamplingParams
    ) -> list[TurnSample]:
        """See :meth:`rltk.sampler.Sampler.sample`; continuations run one after another."""
        if self._closed:
            raise GgufError("this LlamaCppSampler was closed")
        return [self._turn(p.tolist(), params) for p in prompts for _ in range(repeats)]

    def push_weights(self, model: nn.Module) -> None:
        """Refuse: a GGUF file is fixed weights (train with the hf or vllm backend, then convert)."""
        del model
        raise GgufError(
            "a GGUF file holds fixed weights: the llama.cpp sampler cannot take new ones. Train with "
            "rollout.backend hf or vllm, export, then convert the export to GGUF"
        )

    def close(self) -> None:
        """Free the model (idempotent)."""
        if not self._closed:
            self._closed = True
            self.llm.close()


def prompt_token_mismatches(llm: Any, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[Any]) -> list[str]:
    """Ids of the tasks whose rendered prompt llama.cpp tokenizes differently from transformers.

    Each task's chat is rendered to text with the tokenizer's chat template and tokenized by llama.cpp
    (``Llama.tokenize(text, add_bos=False, special=True)``: what a llama.cpp server does with a rendered
    chat) and by transformers (:func:`rltk.chat.render_prompt`, the ids rltk trains on).
    """
    from rltk.chat import render_prompt

    bad = []
    for task in tasks:
        tools = {} if task.tools is None else {"tools": list(task.tools)}
        text = tokenizer.apply_chat_template(
            list(task.messages), add_generation_prompt=True, tokenize=False, **tools
        )
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        if theirs != render_prompt(tokenizer, task.messages, tools=task.tools):
            bad.append(task.id)
    return bad


@dataclass(frozen=True)
class GgufReport:
    """:func:`verify_gguf`'s result: the GGUF under llama.cpp against the export under transformers.

    Attributes:
        n: Eval tasks played (greedy, one rollout each).
        mean_reward_gguf: Mean rubric reward under llama.cpp.
        mean_reward_hf: Mean rubric reward of the safetensors export under transformers.
        accuracy_gguf: Share the env judged correct, llama.cpp.
        accuracy_hf: Same, transformers.
        diff_points: ``100 * (mean_reward_gguf - mean_reward_hf)``.
        identical: Tasks whose greedy rollouts have the same token ids under both.
        seconds_gguf: Wall time of the llama.cpp rollouts (model load excluded).
        seconds_hf: Same, transformers.
        prompt_mismatches: Tasks whose rendered prompt llama.cpp tokenizes differently.
        tolerance_points: The bound on ``|diff_points|``.
        passed: ``|diff_points| <= tolerance_points`` and no prompt mismatches.

    """

    gguf_file: str
    n: int
    mean_reward_gguf: float
    mean_reward_hf: float
    accuracy_gguf: float
    accuracy_hf: float
    diff_points: float
    identical: int
    seconds_gguf: float
    seconds_hf: float
    prompt_mismatches: list[str] = field(default_factory=list)
    tolerance_points: float = TOLERANCE_POINTS
    passed: bool = False

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


@contextlib.contextmanager
def _timed() -> Iterator[list[float]]:
    box: list[float] = []
    start = time.perf_counter()
    yield box
    box.append(time.perf_counter() - start)


def reference_rollouts(export_dir: Path, cfg: Config, n: int) -> tuple[list[Rollout], float]:
    """The export's greedy rollouts on the run's eval tasks under transformers (fp32), and their seconds."""
    from transformers import AutoModelForCausalLM

    from rltk.evaluate import model_rollouts, run_eval_setup
    from rltk.models import load_tokenizer

    env, rubric, tasks, max_new_tokens = run_eval_setup(cfg, n)
    tokenizer = load_tokenizer(str(export_dir))
    model = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32)
    model.eval()
    with _timed() as seconds:
        rollouts = model_rollouts(model, tokenizer, env, rubric, tasks, max_new_tokens)
    return rollouts, seconds[0]


def verify_gguf(
    gguf_file: Path,
    export_dir: Path,
    cfg: Config,
    n: int = 100,
    tolerance_points: float = TOLERANCE_POINTS,
    n_threads: int = 1,
    reference: tuple[list[Rollout], float] | None = None,
    kv_cache: str = "f16",
) -> GgufReport:
    """Play ``n`` eval tasks of the run's env greedily under llama.cpp and under transformers; compare.

    Both sides play the run's eval tasks (:func:`rltk.evaluate.run_eval_setup`) through
    :func:`rltk.evaluate.model_rollouts` (multi-turn envs
    included): llama.cpp via :class:`LlamaCppSampler`, transformers on the safetensors export
    (:func:`reference_rollouts`; pass ``reference``, its result, to compare several GGUFs with one run).
    llama.cpp's tokenization of each rendered prompt is checked too (:func:`prompt_token_mismatches`).
    ``n_threads`` and ``kv_cache`` go to :class:`LlamaCppSampler`.
    """
    from rltk.evaluate import model_rollouts, run_eval_setup, summarize
    from rltk.models import load_tokenizer

    env, rubric, tasks, max_new_tokens = run_eval_setup(cfg, n)
    tokenizer = load_tokenizer(str(export_dir))
    sampler = LlamaCppSampler(Path(gguf_file), tokenizer, n_threads=n_threads, kv_cache=kv_cache)
    with contextlib.closing(sampler):
        mismatches = prompt_token_mismatches(sampler.llm, tokenizer, tasks)
        with _timed() as seconds:
            ours = model_rollouts(sampler, tokenizer, env, rubric, tasks, max_new_tokens)
    theirs, hf_seconds = reference if reference is not None else reference_rollouts(export_dir, cfg, n)
    if len(theirs) != len(ours):
        raise GgufError(f"the reference has {len(theirs)} rollouts for {len(ours)} tasks")
    a, b = summarize("gguf", ours), summarize("hf", theirs)
    diff = 100 * (a.mean_reward - b.mean_reward)
    return GgufReport(
        gguf_file=str(gguf_file),
        n=len(tasks),
        mean_reward_gguf=a.mean_reward,
        mean_reward_hf=b.mean_reward,
        accuracy_gguf=a.accuracy,
        accuracy_hf=b.accuracy,
        diff_points=diff,
        identical=sum(torch.equal(x.token_ids, y.token_ids) for x, y in zip(ours, theirs, strict=True)),
        seconds_gguf=seconds[0],
        seconds_hf=hf_seconds,
        prompt_mismatches=mismatches,
        tolerance_points=tolerance_points,
        passed=abs(diff) <= tolerance_points and not mismatches,
    )
