#!/usr/bin/env bash
# The demo conversion: SmolLM2-135M-Instruct (embedded) on the offline Wikipedia slice, through
# attention transfer, recovery by distillation (stage 2, here without a LoRA adapter), evaluation and export,
# then a generation from the export.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/linearize run configs/demo.yaml "$@"
