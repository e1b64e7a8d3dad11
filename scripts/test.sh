#!/usr/bin/env bash
# Runs the test suite (fast tier; `-m slow` for the heavy one) in the project virtualenv with the pinned
# set. `-m parity` selects the export/decode/resume parity tests, which scripts/test_newest.sh runs
# again under the newest releases pyproject.toml allows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
