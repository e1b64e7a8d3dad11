#!/usr/bin/env bash
# The prepared GPU check, for a lent GPU machine (one call of the device tool, run from the repository root):
# every Triton kernel compiled and checked against its torch form in bf16 (the `gpu`-marked tests), then the
# kernel timings of both suites. Uses the machine's own python3 (PyTorch + Triton; nothing is installed).
# Logs, JSON and plots go to $OUT (the device tool's folder) or .cache/linearize/gpu; paste the printed
# tables into docs/benchmarks.md with the device and the date.
#   bash scripts/gpu_check.sh            # everything (about 5 minutes on an H100, estimated)
#   bash scripts/gpu_check.sh tests      # only the kernel checks
set -uo pipefail
out="${OUT:-.cache/linearize/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" \
    | tee "$out/versions.txt" || { echo "error: no CUDA device or no torch/triton here" >&2; exit 1; }
status=0
python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/test_triton_*.py 2>&1 | tee "$out/gpu_tests.log" || status=1
if [ "${1:-all}" != tests ]; then
    python3 bench/kernels.py --out "$out" 2>&1 | tee "$out/kernels.log" || status=1
    python3 bench/kernels.py --suite delta --out "$out" 2>&1 | tee "$out/kernels_delta.log" || status=1
fi
exit $status
