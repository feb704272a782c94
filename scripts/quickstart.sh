#!/usr/bin/env bash
# The quickstart: set up, then train the embedded SmolLM2-135M on the policy-flagging env and print
# held-out greedy accuracy before and after, beside the trivial policies. Arguments go to quickstart.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${VENV:-.venv}/bin/activate"
exec python scripts/quickstart.py "$@"
