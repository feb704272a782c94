#!/usr/bin/env bash
# Set up (or reuse) .venv-plain: torch and transformers only, no rltk, no peft. It is what a user who serves
# an export has; tests/test_export_verify.py loads exports in it (rltk export --verify DIR --python
# .venv-plain/bin/python). transformers is pinned to the version in rltk's venv (the one CI tests).
# Idempotent. VENV_PLAIN=path overrides the location; PYTHON=python3.x picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_PLAIN:-.venv-plain}
PY=${PYTHON:-python3}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.25.0}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup-plain] creating $VENV"
  "$PY" -m venv "$VENV"
fi
bash scripts/install_torch.sh "$VENV/bin/python" setup-plain
if ! "$VENV/bin/python" -c "import transformers, sys; sys.exit(transformers.__version__ != '$TRANSFORMERS_VERSION')" 2>/dev/null; then
  echo "[setup-plain] installing transformers==$TRANSFORMERS_VERSION"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "transformers==$TRANSFORMERS_VERSION" </dev/null
fi
"$VENV/bin/python" -I - <<'PY'
import importlib.util
missing = [m for m in ("rltk", "peft") if importlib.util.find_spec(m) is not None]
assert not missing, f"this venv must not have {missing}"
print("[setup-plain] ready: torch and transformers, no rltk or peft")
PY
