#!/usr/bin/env bash
# Set up (or reuse) what rltk/gguf.py needs to write and run GGUF files, in the venv $VENV (default .venv):
#   * llama-cpp-python==0.3.36, compiled here from its PyPI source distribution (PyPI ships no prebuilt
#     binaries for it), for rltk.gguf.LlamaCppSampler and verify_gguf;
#   * sentencepiece (llama.cpp's converter imports it while it probes the tokenizer);
#   * llama.cpp's own converter (convert_hf_to_gguf.py, its conversion/ package and its vendored gguf-py),
#     unpacked from the same source distribution into $(rltk cache)/llama.cpp-0.3.36/ (rltk.gguf looks there).
#
# Build time on this 2-core CPU (2026-12-06, CMAKE_BUILD_PARALLEL_LEVEL=2, `time pip wheel` of the sdist):
#     the CMAKE_ARGS below:                       real 5m56s, user 5m09s, sys 0m15s (other work was running)
#     an earlier build, -march=native and libmtmd: real 3m57s, user 5m45s, sys 0m16s (an idle machine)
# so about 4-6 minutes, once: the wheel is kept in the cache ($CACHE/wheel-<flags id>) and a later run (or CI
# on the same machine) installs it in seconds. Only the library is built: llama.cpp's tests, examples, tools
# and server are off, and so is libmtmd (LLAVA_BUILD, multimodal; rltk never loads it).
# GGML_NATIVE=OFF builds the portable x86-64 AVX2/FMA/F16C kernels instead of -march=native: on this VM the
# CPU advertises AMX, so a native build compiles ggml's AMX matmul, and the first q8_0 matmul then dies with
# SIGILL (`tilezero` in ggml_backend_amx_mul_mat: the VM does not enable the AMX tile state). A portable
# wheel is also safe to reuse from the cache on another CPU.
#
# Idempotent: a second run compiles and downloads nothing and only checks the imports. Needs no stdin.
# Environment: VENV=path (default .venv); LLAMA_CPP_SDIST=path to an already downloaded
# llama_cpp_python-0.3.36.tar.gz (its sha256 is checked, as a downloaded one's is) and LLAMA_CPP_WHEEL=path to
# a wheel already built from it with the CMAKE_ARGS below (taken as it is); both are copied into the cache.
# Otherwise the sdist comes from PyPI (`pip download --no-binary :all:`) and the wheel is compiled here.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SENTENCEPIECE_SPEC="sentencepiece>=0.1.98,<0.3.0"  # the bounds of llama.cpp's converter requirements
export CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
start=$(date +%s)

vpy="$VENV/bin/python"
if [ ! -x "$vpy" ]; then
  echo "[setup-gguf] error: no venv at $VENV; run bash scripts/setup.sh first (or set VENV=path)" >&2
  exit 2
fi
pip_q() { "$vpy" -m pip --disable-pip-version-check -q "$@" </dev/null; }
CACHE="$("$vpy" -c 'from rltk.models import cache_dir; print(cache_dir())')/llama.cpp-$VERSION"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
BUILD_ID=$(echo "$CMAKE_ARGS" | sha256sum | cut -c1-12)  # a wheel built with other flags is not reused
WHEELS="$CACHE/wheel-$BUILD_ID"
STAMP="$VENV/.rltk-llama-cpp-$VERSION-$BUILD_ID"
mkdir -p "$WHEELS"

have_sdist() { [ -f "$SDIST" ] && echo "$SDIST_SHA256  $SDIST" | sha256sum -c --quiet - >/dev/null 2>&1; }
if ! have_sdist; then
  tmp=$(mktemp -d)
  if [ -n "${LLAMA_CPP_SDIST:-}" ]; then
    echo "[setup-gguf] source distribution from $LLAMA_CPP_SDIST"
    cp "$LLAMA_CPP_SDIST" "$tmp/"
  else
    echo "[setup-gguf] downloading the llama-cpp-python==$VERSION source distribution (PyPI)"
    pip_q download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
  fi
  mv "$tmp"/llama_cpp_python-"$VERSION".tar.gz "$SDIST"
  rm -rf "$tmp"
  have_sdist || { echo "[setup-gguf] error: $SDIST does not have sha256 $SDIST_SHA256" >&2; exit 1; }
fi

if "$vpy" -c "import sentencepiece" 2>/dev/null; then
  echo "[setup-gguf] sentencepiece already installed"
else
  echo "[setup-gguf] installing $SENTENCEPIECE_SPEC"
  pip_q install "$SENTENCEPIECE_SPEC"
fi

if [ -f "$STAMP" ] && "$vpy" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null
then
  echo "[setup-gguf] llama-cpp-python $VERSION already installed (build $BUILD_ID)"
else
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ] && [ -n "${LLAMA_CPP_WHEEL:-}" ]; then
    echo "[setup-gguf] reusing the wheel $LLAMA_CPP_WHEEL (it must be built with the CMAKE_ARGS above)"
    cp "$LLAMA_CPP_WHEEL" "$WHEELS/"
  elif [ -z "$wheel" ]; then
    echo "[setup-gguf] compiling llama-cpp-python $VERSION (4-6 minutes on 2 cores)"
    pip_q wheel --no-deps -w "$WHEELS" "$SDIST"
  fi
  wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
  echo "[setup-gguf] installing $(basename "$wheel")"
  # --force-reinstall: the same version built with other flags may be installed; then its dependencies
  pip_q install --no-deps --force-reinstall "$wheel"
  pip_q install "$wheel"
  touch "$STAMP"
fi

# The converter: only its Python side (convert_hf_to_gguf.py imports conversion/ next to it and puts
# gguf-py/ on its path), copied to a fresh folder and moved into place, so a crash leaves no half copy.
CONVERTER="$CACHE/convert_hf_to_gguf.py"
if [ ! -f "$CACHE/.unpacked" ]; then
  echo "[setup-gguf] unpacking llama.cpp's converter and gguf-py into $CACHE"
  tmp=$(mktemp -d "$CACHE/.unpack.XXXXXX")
  top="llama_cpp_python-$VERSION/vendor/llama.cpp"
  tar -xzf "$SDIST" -C "$tmp" --strip-components=3 \
    "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
  rm -rf "$CACHE/conversion" "$CACHE/gguf-py"
  mv "$tmp/conversion" "$tmp/gguf-py" "$tmp/LICENSE" "$tmp/convert_hf_to_gguf.py" "$CACHE/"
  rm -rf "$tmp"
  touch "$CACHE/.unpacked"
else
  echo "[setup-gguf] converter already unpacked in $CACHE"
fi

# The checks that matter: the sampler's imports, and the converter starts with its own gguf-py.
"$vpy" -c "import llama_cpp, sentencepiece; print('[setup-gguf] llama_cpp', llama_cpp.__version__, \
'sentencepiece', sentencepiece.__version__)"
PYTHONPATH="$CACHE/gguf-py" "$vpy" "$CONVERTER" --help >/dev/null
echo "[setup-gguf] converter: $CONVERTER"
echo "[setup-gguf] done in $(( $(date +%s) - start )) s"
