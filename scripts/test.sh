#!/usr/bin/env bash
# Runs the test suite (fast tier; `-m slow` for the heavy one) in the project virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
