"""``rltk serve``: an export behind a real OpenAI-compatible server (``transformers serve``, vLLM's)
answers eval tasks of its env over HTTP exactly as local greedy generation does, and leaves no process and
no bound port behind, however it is stopped."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_overrides
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from rltk import plugins
from rltk.cli_serve import main as serve_main
from rltk.config import load_config
from rltk.export import ExportError, export
from rltk.models import make_tiny_model
from rltk.serve import (
    VLLM_INSTALL,
    ServeError,
    Server,
    free_port,
    greedy_only,
    port_is_free,
    running_server,
)
from rltk.trainer import Trainer
from rltk.vllm_sampler import DEFAULT_PYTHON, PYTHON_ENV

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "quickstart.yaml")
VOWELS = "rewards=[{name: 'plugins_for_tests:vowel_share'}]"
VLLM_PYTHON = os.environ.get(PYTHON_ENV) or str(DEFAULT_PYTHON)
TASKS = 3  # eval tasks of the env each server answers
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def exported(
    tokenizer: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A 2-step tiny run and its export. The tiny Llama has head size 32 (vLLM's CPU attention takes no 16)
    and initializer_range 0.3 (at 0.02 greedy repeats one token whatever the weights: a trivial parity)."""
    root = tmp_path_factory.mktemp("serve")
    make_tiny_model(tokenizer, heads=2, kv_heads=1, init_range=0.3).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    Trainer(load_config(RECIPE, [*tiny_overrides(str(root / "tiny"), root / "run"), VOWELS])).train()
    # check=False: the export's own verification (tests/test_export.py) takes a minute here; what is tested
    # below is the server against local generation on the same files
    return root / "run", export(root / "run", root / "out", check=False)


@pytest.fixture(scope="module")
def tasks(exported: tuple[Path, Path]) -> tuple[list[dict[str, Any]], int]:
    """Eval tasks of the run's env, and its token budget (the recipe's rollout.max_new_tokens)."""
    cfg = load_config(exported[0] / "config.yaml", [])
    assert cfg.env.name == "policy_flagging"
    env = plugins.make_env(cfg.env.name, cfg.env.options)
    prompts = [{"id": t.id, "messages": t.messages} for t in env.tasks("eval", TASKS, seed=0)]
    return prompts, cfg.rollout.max_new_tokens


@pytest.fixture(scope="module")
def local_greedy(exported: tuple[Path, Path], tasks: tuple[list[dict[str, Any]], int]) -> list[str]:
    """Plain transformers' greedy answers on the export, with its chat template, decoded as servers do."""
    out, (prompts, budget) = exported[1], tasks
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    answers = []
    for p in prompts:
        ids = tok.apply_chat_template(
            p["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            seq = model.generate(**ids, max_new_tokens=budget, do_sample=False)
        answers.append(tok.decode(seq[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    # A random model answers each prompt differently: equal answers below are no coincidence of blank text
    assert all(a.strip() for a in answers) and len(set(answers)) == len(answers), answers
    return answers


def _chat(
    server: Server, messages: list[dict[str, Any]], max_tokens: int, temperature: float = 0.0
) -> dict[str, Any]:
    """POST /v1/chat/completions with urllib (greedy by default: temperature 0)."""
    body = {"model": server.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
    body |= {"seed": 0} if temperature else {}
    request = urllib.request.Request(
        f"{server.base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def _pids_with_port(port: int) -> list[int]:
    """Processes whose command line has ``--port PORT`` (a server rltk started and may have left behind)."""
    needle = f"\0--port\0{port}\0".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "cmdline").read_bytes() + b"\0":
                found.append(int(proc.name))
        except OSError:  # it exited meanwhile
            pass
    return found


def _assert_gone(server: Server) -> None:
    assert server.proc.poll() is not None
    assert not server.group_alive()
    assert not _pids_with_port(server.port)
    assert port_is_free(server.host, server.port)


def _assert_answers_like_local_greedy(
    server: Server, tasks: tuple[list[dict[str, Any]], int], local: list[str]
) -> None:
    prompts, budget = tasks
    for p, want in zip(prompts, local, strict=True):
        response = _chat(server, p["messages"], budget)
        (choice,) = response["choices"]
        assert choice["message"]["content"] == want, (p["id"], choice, want)
        assert response["usage"]["completion_tokens"] <= budget


def test_transformers_serve_answers_like_local_greedy(
    exported: tuple[Path, Path], tasks: tuple[list[dict[str, Any]], int], local_greedy: list[str]
) -> None:
    with running_server(
        exported[1], "transformers", HOST, 0, timeout=180, extra_args=["--device", "cpu"]
    ) as s:
        print(f"transformers serve healthy in {s.startup_s:.1f} s")
        assert s.model == str(exported[1].resolve())
        _assert_answers_like_local_greedy(s, tasks, local_greedy)
        # What `rltk serve`'s note says: transformers serve samples only if generation_config.json says so
        assert greedy_only(exported[1])
        sampled = [_chat(s, p["messages"], tasks[1], temperature=1.0) for p in tasks[0]]
        assert [r["choices"][0]["message"]["content"] for r in sampled] == local_greedy
        assert s.log_path.is_file()
    _assert_gone(s)
    assert not s.log_path.exists()  # a clean stop removes the temp log


@pytest.mark.skipif(not os.path.isfile(VLLM_PYTHON), reason=f"no vLLM venv at {VLLM_PYTHON}: {VLLM_INSTALL}")
def test_vllm_serve_answers_like_local_greedy(
    exported: tuple[Path, Path], tasks: tuple[list[dict[str, Any]], int], local_greedy: list[str]
) -> None:
    kwargs = {"timeout": 300, "vllm_python": VLLM_PYTHON, "kv_cache_gib": 0.25}
    with running_server(exported[1], "vllm", HOST, 0, **kwargs) as s:
        print(f"vLLM server healthy in {s.startup_s:.1f} s")
        _assert_answers_like_local_greedy(s, tasks, local_greedy)
        sampled = [_chat(s, p["messages"], tasks[1], temperature=1.0) for p in tasks[0]]
        assert [r["choices"][0]["message"]["content"] for r in sampled] != local_greedy  # vLLM does sample
    _assert_gone(s)


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    """Each line the process prints, then None at its end."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)


def _read_until(lines: queue.Queue[str | None], marker: str, timeout: float) -> str:
    """The process's output up to the line holding ``marker``; fails at its end or after ``timeout`` s."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            pytest.fail("rltk serve exited before it was ready:\n" + "".join(seen))
        seen.append(line)
        if marker in line:
            return "".join(seen)
    pytest.fail(f"no {marker!r} within {timeout} s:\n" + "".join(seen))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    assert match is not None, f"no {pattern!r} in:\n{text}"
    return match.group(1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["int", "term", "kill"])
def test_cli_prints_a_curl_line_that_works_and_stops_the_server(
    exported: tuple[Path, Path], tmp_path: Path, sig: int
) -> None:
    """Ctrl-C and SIGTERM stop the server and exit 0; a SIGKILLed rltk's server follows it (PDEATHSIG)."""
    cmd = [sys.executable, "-m", "rltk.cli_serve", str(exported[1]), "--port", "0", "--timeout", "180"]
    if sig == signal.SIGKILL:  # a SIGKILLed rltk cannot remove its temp log
        cmd += ["--log", str(tmp_path / "server.log")]
    # Ctrl-C reaches a foreground process with SIGINT's default action; a test run started in the background
    # by a non-interactive shell (`scripts/test.sh &`) ignores SIGINT, and its children would inherit that
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc, lines), daemon=True)
    reader.start()
    try:
        printed = _read_until(lines, "Ctrl-C stops it.", timeout=200)
        pid = int(_find(r"\(pid (\d+),", printed))
        port = int(_find(r"OpenAI base URL: http://127\.0\.0\.1:(\d+)/v1", printed))
        assert "every answer is greedy" in printed
        curl = next(line.strip() for line in printed.splitlines() if line.strip().startswith("curl "))
        if shutil.which("curl"):
            answer = json.loads(subprocess.run(shlex.split(curl), capture_output=True, check=True).stdout)
            assert answer["choices"][0]["message"]["role"] == "assistant", answer
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(10)
    rest = []
    while (line := lines.get_nowait()) is not None:
        rest.append(line)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 0 and "server stopped" in "".join(rest), (code, rest)
        assert not Path(_find(r", log (\S+)\)", printed)).exists()  # a clean stop removes the temp log
    deadline = time.monotonic() + 30  # after a SIGKILL the server's own SIGTERM shutdown still runs
    while (_group_alive(pid) or not port_is_free(HOST, port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(pid), subprocess.run(
        ["ps", "-o", "pid,stat,cmd", "-g", str(pid)], text=True, capture_output=True
    ).stdout
    assert not _pids_with_port(port) and port_is_free(HOST, port)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_export_starts_no_server(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(exported[1], tmp_path / "copy"))
    _flip_byte(out / "model.safetensors")
    port = free_port()
    with pytest.raises(ExportError, match=r"model\.safetensors changed"), running_server(out, port=port):
        pass
    assert serve_main([str(out), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Fix: re-export" in err and "Traceback" not in err, err
    assert not _pids_with_port(port)


def test_a_server_that_exits_at_start_fails_with_its_log(exported: tuple[Path, Path], tmp_path: Path) -> None:
    port = free_port()
    with (
        pytest.raises(
            ServeError,
            match=r"(?s)exited with code 2 before it was ready\. Its last log lines \(.*\):\n.*serve --help",
        ),
        running_server(exported[1], port=port, extra_args=["--no-such-option"], log_path=tmp_path / "log"),
    ):
        pass
    assert not _pids_with_port(port) and port_is_free(HOST, port)


def test_a_server_that_is_not_healthy_in_time_is_stopped(exported: tuple[Path, Path], tmp_path: Path) -> None:
    port = free_port()
    with (
        pytest.raises(ServeError, match=r"not healthy on http://127\.0\.0\.1:\d+/v1 within 0\.5 s"),
        running_server(exported[1], port=port, timeout=0.5, log_path=tmp_path / "log"),
    ):
        pass
    assert not _pids_with_port(port) and port_is_free(HOST, port)


def test_a_port_in_use_is_refused(exported: tuple[Path, Path]) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            pytest.raises(ServeError, match=f"port {port} on {HOST} is in use"),
            running_server(exported[1], port=port),
        ):
            pass


def test_missing_serving_dependencies_name_the_install(
    exported: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if transformers[serving] were not installed
    with (
        pytest.raises(ServeError, match=r"fastapi is not installed .* pip install 'rltk\[serve\]'"),
        running_server(exported[1]),
    ):
        pass
    assert (
        serve_main([str(exported[1]), "--backend", "vllm", "--vllm-python", "/nonexistent/bin/python"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bash scripts/setup_vllm.sh" in err, err
