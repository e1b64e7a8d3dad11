#!/usr/bin/env bash
# Runs the export/decode/resume parity tests (marker `parity`) in a second virtualenv, .venv-newest,
# resolved from pyproject.toml alone rather than requirements.txt: pip takes the newest transformers,
# peft, datasets and deepspeed that the declared ranges allow, which is what a user's `pip install`
# gets. A release inside the declared ranges that breaks decoding or resume fails here. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LINEARIZE_NEWEST_VENV:-.venv-newest}
# The stamp names the pyproject hash: editing the ranges re-resolves. Delete the virtualenv to pick up
# releases published since it was made (CI starts from a fresh clone, so it always resolves anew).
stamp="$venv/.deps-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  # torch is pinned in the same command, or pip pulls a multi-GB CUDA build; eager upgrades move an
  # existing virtualenv to the newest releases the new ranges allow.
  "$venv/bin/pip" install -q --upgrade --upgrade-strategy eager torch==2.13.0 -e '.[test,deepspeed,triton]'
  rm -f "$venv"/.deps-*
  touch "$stamp"
fi
"$venv/bin/python" - <<'PY'
from importlib.metadata import PackageNotFoundError, version


def installed(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


names = ["torch", "transformers", "peft", "datasets", "deepspeed", "triton", "accelerate", "safetensors",
         "tokenizers", "huggingface-hub"]
print("newest allowed by pyproject.toml: " + ", ".join(f"{n} {installed(n)}" for n in names))
PY
# The command-line -m replaces the one in pyproject's addopts, so the slow and gpu tiers stay excluded here.
exec "$venv/bin/python" -m pytest -q -m "parity and not slow and not gpu" "$@"
