"""``rltk serve DIR``: serve an export until Ctrl-C or SIGTERM (the server itself: :mod:`rltk.serve`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from rltk.serve import (
    BACKENDS,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT_S,
    SERVE_INSTALL,
    VLLM_INSTALL,
    ServeError,
    Server,
    greedy_only,
    running_server,
)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP as Ctrl-C: unwinds through :func:`running_server`, which stops the server."""
    raise KeyboardInterrupt


def _print_ready(server: Server, out: TextIO) -> None:
    """The base URL and a curl line, for the person who ran ``rltk serve``."""
    lines = [
        f"{server.backend} server ready in {server.startup_s:.1f} s (pid {server.proc.pid}, log "
        f"{server.log_path})",
        f"OpenAI base URL: {server.base_url}   model: {server.model}",
        f"try it:\n  {server.curl_command()}",
    ]
    if server.backend == "transformers" and greedy_only(Path(server.model)):
        lines.append(
            "note: transformers serve samples only when generation_config.json sets do_sample; this export's "
            "does not, so every answer is greedy whatever the request's temperature (--backend vllm samples)"
        )
    print("\n".join([*lines, "Ctrl-C stops it."]), file=out, flush=True)


def serve(
    export_dir: str | os.PathLike[str],
    backend: str = "transformers",
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    out: TextIO | None = None,
    **kwargs: Any,
) -> int:
    """Serve an export until Ctrl-C or SIGTERM (what ``rltk serve`` runs); stops the server's whole group.

    Args:
        export_dir: An ``rltk export`` directory.
        backend: ``"transformers"`` or ``"vllm"``.
        host: The address to listen on.
        port: The port (0: any free one).
        out: Where the URL and the curl line go (default: stdout).
        **kwargs: The other keyword arguments of :func:`start_server` (``timeout``, ``vllm_python``, ...).

    Returns:
        0 once stopped by Ctrl-C, SIGTERM or SIGHUP.

    Raises:
        ExportError: The export does not match its ``SHA256SUMS``.
        ServeError: As :func:`start_server`, or the server exited by itself (with its last log lines).

    """
    out = out if out is not None else sys.stdout
    handled = (signal.SIGTERM, signal.SIGHUP)
    main_thread = threading.current_thread() is threading.main_thread()  # signal.signal works there only
    previous = {sig: signal.signal(sig, _interrupt) for sig in handled} if main_thread else {}
    try:
        where = f"{host}:{port}" if port else f"a free port of {host}"
        print(f"starting the {backend} server for {export_dir} on {where} ...", file=out, flush=True)
        with running_server(export_dir, backend, host, port, **kwargs) as server:
            _print_ready(server, out)
            code = server.proc.wait()
            raise ServeError(
                f"the {backend} server exited by itself with code {code}. Its last log lines "
                f"({server.log_path}):\n{server.log_tail()}"
            )
    except KeyboardInterrupt:
        print("server stopped", file=out, flush=True)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``serve DIR [--backend] [--host] [--port] [--timeout] ...`` to an ``rltk`` subparsers object."""
    p = subparsers.add_parser(
        "serve",
        help="serve an rltk export on an OpenAI-compatible chat endpoint (transformers serve or vLLM)",
        description="Check an rltk export against its SHA256SUMS, start `transformers serve` (or vLLM's "
        "OpenAI server) on it, wait until it is healthy, print its URL and a curl line; Ctrl-C stops it.",
    )
    p.add_argument("export_dir", metavar="DIR", help="an rltk export (rltk export RUN_DIR --out DIR)")
    p.add_argument(
        "--backend",
        default="transformers",
        choices=BACKENDS,
        help=f"transformers: `transformers serve` ({SERVE_INSTALL}); vllm: vLLM's OpenAI server in the "
        f"vLLM venv ({VLLM_INSTALL})",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port)")
    p.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds the server may take to be healthy"
    )
    p.add_argument("--vllm-python", default=None, help="vllm: the vLLM venv's python (default: .venv-vllm)")
    p.add_argument("--vllm-kv-cache-gib", type=float, default=2.0, help="vllm: KV cache size, GiB")
    p.add_argument("--log", default=None, help="write the server's output here (default: a temp file)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    """``rltk serve``: :func:`serve` of the parsed arguments; a :class:`ServeError`: ``error: …``, exit 2."""
    try:
        return serve(
            args.export_dir,
            args.backend,
            args.host,
            args.port,
            timeout=args.timeout,
            vllm_python=args.vllm_python,
            kv_cache_gib=args.vllm_kv_cache_gib,
            log_path=args.log,
        )
    except ServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m rltk.cli_serve DIR ...``: ``rltk serve`` without the rest of the CLI."""
    from rltk.errors import user_errors

    parser = argparse.ArgumentParser(prog="python -m rltk.cli_serve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return cmd_serve(args)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
