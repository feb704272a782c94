"""The vLLM side of :class:`rltk.vllm_sampler.VLLMSampler`: a standalone script run by the vLLM venv's python.

    RLTK_VLLM_AUTHKEY=hex .venv-vllm/bin/python rltk/vllm_worker.py --address SOCK --parent-pid PID

vLLM's CPU build pins an older transformers than rltk needs, so vLLM lives in its own virtual env
(``bash scripts/setup_vllm.sh``) and in its own process. This script imports nothing of rltk and nothing
outside that env (its top level imports the standard library only, so the main venv can still import it for
doctests). It connects back to the client's :class:`multiprocessing.connection.Listener` on a Unix socket and
serves one request at a time; every request is a dict with an ``op`` and every answer is
``{"ok": True, "result": ...}`` or ``{"ok": False, "error": traceback}``:

* ``init`` (``model``: an HF model directory, ``dtype``, ``engine``: extra ``vllm.LLM`` keyword arguments):
  builds the in-process engine (``enforce_eager``, prefix caching, ``logprobs_mode="processed_logprobs"``,
  no chunked prefill: every prompt is prefilled in one step).
* ``sample`` (``prompts``: P id lists, ``repeats``: G, ``max_tokens``, ``min_tokens``, ``temperature`` (0 =
  greedy), ``top_p``, ``top_k`` (0 = off), ``stop``: stop strings, ``stop_token_ids``: the ids that end a
  turn, ``seeds``: P*G ints or None): one request per continuation (``TokensPrompt``: the ids are never
  re-tokenized), each with its own seed. Returns P*G ``(token_ids, logprobs, finished)``: the ids as sampled,
  cut after the first stop id (kept; vLLM stops there) or after the token that completes a stop string
  (kept whole; vLLM stops there), and each token's log-prob under the processed distribution (temperature,
  top-k, top-p, min-tokens suppression). ``finished`` is False when ``max_tokens`` (or the model's context)
  cut the continuation.
* ``load_weights`` (``path``: a safetensors file, e.g. in /dev/shm): ``reload_weights`` from it, then the
  prefix cache is reset (its KV entries were computed with the old weights).
* ``close``: answers, then exits.

The worker exits when the connection closes, and a watchdog thread ends it within a second of its parent's
death (``--parent-pid``), removing the client's temp dir (``--cleanup-dir``: the model copy, the socket),
so a killed trainer leaves no engine and no files behind. SIGINT is ignored: a Ctrl-C in the
terminal reaches the whole process group, and the client decides when its worker stops.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

AUTHKEY_ENV = "RLTK_VLLM_AUTHKEY"


def _drop_script_dir() -> None:
    """Remove this file's directory (rltk/) from ``sys.path``: its modules would shadow top-level imports."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]


def _watch_parent(parent_pid: int, cleanup_dir: str | None) -> None:
    """End this process as soon as the parent is gone (re-parented), removing ``cleanup_dir`` first."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                if cleanup_dir:  # the client's private temp dir (model copy, socket): nobody else removes it
                    import shutil

                    shutil.rmtree(cleanup_dir, ignore_errors=True)
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, name="rltk-vllm-parent-watch", daemon=True).start()


class Engine:
    """The vLLM engine and the request handlers (vLLM is imported here, not at module level)."""

    def __init__(self, model: str, dtype: str, engine: dict[str, Any]) -> None:
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": model,
            "dtype": dtype,
            "enforce_eager": True,
            "enable_prefix_caching": True,
            "logprobs_mode": "processed_logprobs",
            "seed": 0,
            # Every prompt is prefilled whole: a chunked prefill discards the token it samples and rewinds
            # the request's generator, which a seeded request's CPU generator cannot do (vLLM raises
            # "CPU Generator does not use offset" once a step's prompts exceed the token budget). Without it
            # vLLM sets the budget to at least the context, so every prompt fits one step.
            "enable_chunked_prefill": False,
        }
        kwargs.update(engine)
        self.llm = LLM(**kwargs)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def info(self) -> dict[str, Any]:
        """What the client may want to know of the engine."""
        import vllm

        cache = self.llm.llm_engine.vllm_config.cache_config
        return {
            "vllm": vllm.__version__,
            "max_model_len": self.max_model_len,
            "pid": os.getpid(),
            "kv_cache_memory_bytes": cache.kv_cache_memory_bytes,
        }

    def sample(
        self,
        prompts: list[list[int]],
        repeats: int,
        max_tokens: int,
        min_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        stop: list[str],
        stop_token_ids: list[int],
        seeds: list[int] | None,
    ) -> list[tuple[list[int], list[float], bool]]:
        """P*G continuations, those of prompt ``i`` at ``i*G .. i*G+G-1`` (see the module docstring)."""
        from vllm import SamplingParams, TokensPrompt

        if seeds is not None and len(seeds) != len(prompts) * repeats:
            raise ValueError(f"need {len(prompts) * repeats} seeds, got {len(seeds)}")
        greedy = temperature == 0
        requests, params = [], []
        for i, ids in enumerate(prompts):
            if len(ids) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens, the engine's context is {self.max_model_len}"
                )
            room = min(max_tokens, self.max_model_len - len(ids))
            for g in range(repeats):
                requests.append(TokensPrompt(prompt_token_ids=list(ids)))
                params.append(
                    SamplingParams(
                        n=1,
                        max_tokens=room,
                        min_tokens=min(min_tokens, room),
                        temperature=0.0 if greedy else temperature,
                        top_p=1.0 if greedy else top_p,
                        top_k=0 if greedy or top_k <= 0 else top_k,
                        stop=list(stop) or None,
                        stop_token_ids=list(stop_token_ids),
                        include_stop_str_in_output=False,  # the text only: token_ids keep the stop token
                        seed=None if seeds is None or greedy else int(seeds[i * repeats + g]),
                        logprobs=0,  # the sampled token's log-prob only
                        skip_special_tokens=True,
                    )
                )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        stops = set(stop_token_ids)
        results = []
        for out in outputs:
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            if comp.logprobs is None or len(comp.logprobs) != len(ids):
                raise RuntimeError(f"vLLM returned {len(ids)} tokens but no log-prob for each")
            logp = [float(comp.logprobs[t][tok].logprob) for t, tok in enumerate(ids)]
            finished = comp.finish_reason == "stop"
            end = next((t + 1 for t, tok in enumerate(ids) if tok in stops), None)
            if end is not None:  # vLLM stops at the first stop id already; this only guards against a change
                ids, logp, finished = ids[:end], logp[:end], True
            results.append((ids, logp, finished))
        return results

    def load_weights(self, path: str) -> dict[str, Any]:
        """Reload every weight from the safetensors file ``path``; reset the prefix cache."""
        from safetensors import safe_open

        t0 = time.perf_counter()
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
            weights = {name: f.get_tensor(name) for name in names}
        read_s = time.perf_counter() - t0
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
        self.llm.reset_prefix_cache()
        return {"tensors": len(names), "read_s": read_s, "seconds": time.perf_counter() - t0}


def serve(conn: Any) -> None:
    """Answer requests on ``conn`` until ``close`` or until the client goes away."""
    engine: Engine | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        op = msg.get("op")
        try:
            if op == "close":
                conn.send({"ok": True, "result": None})
                return
            if op == "init":
                t0 = time.perf_counter()
                engine = Engine(msg["model"], msg["dtype"], dict(msg.get("engine") or {}))
                result: Any = {**engine.info(), "seconds": time.perf_counter() - t0}
            elif engine is None:
                raise RuntimeError(f"request {op!r} before init")
            elif op == "sample":
                result = engine.sample(**msg["args"])
            elif op == "load_weights":
                result = engine.load_weights(msg["path"])
            else:
                raise ValueError(f"unknown request {op!r}")
            reply = {"ok": True, "result": result}
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


def main(argv: list[str] | None = None) -> int:
    """Connect back to the client and serve it; the exit code is 0 after ``close`` or a closed connection."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the client's Unix socket")
    parser.add_argument("--parent-pid", type=int, required=True, help="exit when this process is gone")
    parser.add_argument("--cleanup-dir", help="remove this directory if the parent dies first")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(args.parent_pid, args.cleanup_dir)
    key = os.environ.pop(AUTHKEY_ENV, "")
    if not key:
        print(f"rltk vllm_worker: ${AUTHKEY_ENV} is not set", file=sys.stderr)
        return 2
    from multiprocessing.connection import Client

    conn = Client(args.address, family="AF_UNIX", authkey=bytes.fromhex(key))
    try:
        serve(conn)
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    _drop_script_dir()
    sys.exit(main())
