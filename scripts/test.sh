#!/usr/bin/env bash
# The test command: set up the venvs if needed (rltk's, and vLLM's for the vLLM sampler), lint, then run the
# unit tests and the slow tests marked `ci`
# (those use the real SmolLM2-135M). Extra arguments go to pytest (e.g. scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh  # the vLLM sampler's own venv (tests/test_vllm_sampler.py)
bash scripts/setup_plain.sh  # torch + transformers only: exports load there (tests/test_export_verify.py)
bash scripts/setup_gguf.sh   # llama.cpp (built once, cached) and its converter (tests/test_gguf.py)
. "${VENV:-.venv}/bin/activate"
ruff check .
ruff format --check .
if [ $# -gt 0 ]; then
  exec python -m pytest "$@"
fi
# --durations: CI is kept under 25 minutes; the log names what to speed up when it creeps past
python -m pytest -q --durations=25
python -m pytest -q -m "slow and ci" --durations=5
