#!/usr/bin/env bash
# install_torch.sh PYTHON TAG: install torch $TORCH_VERSION (default 2.13.0) into PYTHON's environment unless
# it has torch already: the local wheelhouse first (this machine's CPU wheel), else the CUDA build where a GPU
# is present, else the CPU build from download.pytorch.org (PyPI as the fallback). TAG prefixes the messages.
# Shared by scripts/setup.sh, setup_vllm.sh and setup_plain.sh.
set -euo pipefail
vpy=$1
tag=$2
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
pip_q() { "$vpy" -m pip install --disable-pip-version-check -q "$@" </dev/null; }
if "$vpy" -c "import torch" 2>/dev/null; then
  echo "[$tag] torch already installed: $("$vpy" -c 'import torch; print(torch.__version__)')"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if "$vpy" -m pip download -q --no-index --no-deps "torch==$TORCH_VERSION" -d "$tmp" 2>/dev/null; then
  echo "[$tag] torch $TORCH_VERSION from the local wheelhouse"
  pip_q "$tmp"/torch-*.whl
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[$tag] torch $TORCH_VERSION (CUDA build, a GPU is present)"
  pip_q "torch==$TORCH_VERSION"
else
  echo "[$tag] torch $TORCH_VERSION CPU build (download.pytorch.org/whl/cpu, else PyPI)"
  pip_q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu || pip_q "torch==$TORCH_VERSION"
fi
