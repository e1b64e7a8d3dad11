"""CPU exp's underflow trap: torch's vectorized exp on inputs whose result underflows fp32 (below about
−87.3, and −inf) against the same inputs floored first (`linearize.ops._common.floored_exp`, what the
ops use). One `[9, 8, 64, 128]` fp32 tensor (a layer's window-score blocks on the demo model).

    python bench/cpu_exp.py [--threads 1] [--write docs/performance.md]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._docs import publish  # noqa: E402
from linearize.ops._common import floored_exp  # noqa: E402

SECTION_TITLE = "## CPU exp and underflow (bench/cpu_exp.py)"
SHAPE = (9, 8, 64, 128)


def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    uniform = torch.rand(SHAPE, generator=gen)  # [0, 1)
    half_masked = -10 * uniform
    half_masked[..., SHAPE[-1] // 2:] = float("-inf")  # a window block: half its keys masked
    return {
        "[-10, 0]": -10 * uniform,
        "[-87, 0]": -87 * uniform,
        "[-100, 0]": -100 * uniform,
        "[-300, 0] (strong decay)": -300 * uniform,
        "half -inf (masked block)": half_masked,
    }


def median_ms(fn, x, repeats: int) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def table(repeats: int) -> str:
    rows = ["| input | `x.exp()` ms | `floored_exp(x)` ms | speed-up |", "|---|---|---|---|"]
    for name, x in inputs().items():
        plain, floored = median_ms(torch.exp, x, repeats), median_ms(floored_exp, x, repeats)
        rows.append(f"| {name} | {plain:.3f} | {floored:.3f} | {plain / floored:.1f}× |")
    header = (f"{'×'.join(map(str, SHAPE))} fp32 elements, median of {repeats}; {platform.machine()}, "
              f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; {date.today().isoformat()}.")
    return f"{SECTION_TITLE}\n\n{header}\n\n" + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--write", type=Path, help="replace this section of a markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = table(args.repeats)
    publish(text, args.write, SECTION_TITLE, "# Performance\n")


if __name__ == "__main__":
    main()
