"""Attention-kernel timings: our ops (linear, gated linear, window + linear) against fla's Triton
kernels (when importable) and torch SDPA causal, forward and forward + backward, over sequence length.

GPU (default): B=4, H=16, D=128, bf16, T ∈ {1K … 32K}; medians of `triton.testing.do_bench`; our ops run
with backend="triton". CPU (`--cpu`): small shapes, our torch chunk forms and SDPA, medians of
`time.perf_counter` repeats. `--cpu --backend triton` runs our Triton kernels under the interpreter
(TRITON_INTERPRET=1, set before any kernel module is imported): not a speed of the kernels on a GPU, but
a like-for-like check that a kernel change did not add work.

    python bench/kernels.py                # GPU
    python bench/kernels.py --cpu          # CPU, prints a markdown table
    python bench/kernels.py --cpu --backend triton --cases linear_attn --lengths 64 256
Writes `<out>/kernels_<device>.json` and `.png` (out defaults to .cache/linearize/bench).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from linearize.ops.gated_linear_attn import chunk_gated_linear_attn  # noqa: E402
from linearize.ops.linear_attn import chunk_linear_attn  # noqa: E402
from linearize.ops.window_linear_attn import window_linear_attn  # noqa: E402

GPU_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
GPU_SHAPE = dict(batch=4, heads=16, dim=128)
CPU_LENGTHS = [256, 512, 1024, 2048]
CPU_SHAPE = dict(batch=1, heads=4, dim=64)
WINDOW_SIZE = 64  # the LoLCATs default window
LIGER_GATE_DIVISOR = 16  # Liger's g = logsigmoid(k) / 16
CPU_REPEATS = 5
MS_PER_S = 1000.0


def make_inputs(batch, seq_len, heads, dim, dtype, device):
    """q, k, v, fq, fk `[B, T, H, D]` (positive q/k, as a feature map gives), g ≤ 0, window_logit `[H]`."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, fn=torch.rand):
        return fn(*shape, generator=gen, device=device, dtype=torch.float32)

    shape = (batch, seq_len, heads, dim)
    tensors = dict(
        q=rand(*shape), k=rand(*shape), v=rand(*shape, fn=torch.randn),
        fq=rand(*shape), fk=rand(*shape),
        g=F.logsigmoid(rand(*shape, fn=torch.randn)) / LIGER_GATE_DIVISOR,
    )
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    tensors["g"] = tensors["g"].float()  # log-decays stay fp32 (cumulative sums)
    tensors["window_logit"] = torch.zeros(heads, device=device)
    return tensors


def _ours(backend: str) -> dict[str, Callable]:
    return {
        "linear_attn": lambda x: chunk_linear_attn(x["q"], x["k"], x["v"], backend=backend)[0],
        "gated_linear_attn": lambda x: chunk_gated_linear_attn(x["q"], x["k"], x["v"], x["g"], backend=backend)[0],
        "window_linear_attn": lambda x: window_linear_attn(
            x["q"], x["k"], x["v"], x["fq"], x["fk"], x["window_logit"], window_size=WINDOW_SIZE, backend=backend
        )[0],
    }


def _fla_cases() -> dict[str, Callable]:
    """fla's chunk kernels when fla imports (GPU only), else nothing."""
    try:
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn as fla_linear
    except ImportError:
        return {}
    return {
        "fla chunk_linear_attn": lambda x: fla_linear(x["q"], x["k"], x["v"], normalize=True)[0],
        "fla chunk_gla": lambda x: chunk_gla(x["q"], x["k"], x["v"], x["g"])[0],
    }


def _sdpa(x):
    q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))  # [B, H, T, D]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)  # [B, T, H, D]


def cases(device: str, backend: str | None = None, only: list[str] | None = None) -> dict[str, Callable]:
    """Timed closures by name; `only` keeps the names containing one of its strings."""
    backend = backend or ("triton" if device == "cuda" else "torch")
    found = {f"ours {name} ({backend})": fn for name, fn in _ours(backend).items()}
    if device == "cuda":
        found.update(_fla_cases())
    found["torch sdpa causal"] = _sdpa
    if only:
        found = {name: fn for name, fn in found.items() if any(part in name for part in only)}
    return found


def _with_backward(fn: Callable, inputs: dict) -> Callable:
    """A closure running forward + backward of `fn` with respect to every floating input."""
    leaves = {n: t.detach().requires_grad_(t.is_floating_point()) for n, t in inputs.items()}

    def step():
        out = fn(leaves)
        out.backward(torch.ones_like(out))

    return step


def _median_ms_cpu(step: Callable) -> float:
    step()  # warm-up
    times = []
    for _ in range(CPU_REPEATS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * MS_PER_S


def _median_ms_gpu(step: Callable) -> float:
    import triton.testing

    return triton.testing.do_bench(step, return_mode="median")


def run(device: str, lengths: list[int], shape: dict, dtype, backend=None, only=None) -> list[dict]:
    timer = _median_ms_gpu if device == "cuda" else _median_ms_cpu
    rows = []
    for seq_len in lengths:
        inputs = make_inputs(shape["batch"], seq_len, shape["heads"], shape["dim"], dtype, device)
        for name, fn in cases(device, backend, only).items():
            row = dict(case=name, seq_len=seq_len)
            for mode, make_step in (("fwd", lambda f=fn: (lambda: f(inputs))), ("fwd+bwd", lambda f=fn: _with_backward(f, inputs))):
                try:
                    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                        row[mode] = timer(make_step())
                except torch.OutOfMemoryError:
                    row[mode] = math.nan
                    torch.cuda.empty_cache()
            rows.append(row)
            print(f"T={seq_len:6d} {name:38s} fwd {row['fwd']:9.2f} ms  fwd+bwd {row['fwd+bwd']:9.2f} ms", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lengths = sorted({r["seq_len"] for r in rows})
    names = list(dict.fromkeys(r["case"] for r in rows))
    lookup = {(r["case"], r["seq_len"]): r for r in rows}
    lines = ["| case | mode | " + " | ".join(f"T={t}" for t in lengths) + " |",
             "|---|---|" + "---|" * len(lengths)]
    for name in names:
        for mode in ("fwd", "fwd+bwd"):
            cells = [f"{lookup[(name, t)][mode]:.2f}" for t in lengths]
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        for name in dict.fromkeys(r["case"] for r in rows):
            pts = [(r["seq_len"], r[mode]) for r in rows if r["case"] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="median ms", title=f"{title}: {mode}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="small CPU shapes, torch backends, perf_counter medians")
    parser.add_argument("--out", type=Path, default=REPO / ".cache/linearize/bench", help="where JSON and PNG go")
    parser.add_argument("--lengths", type=int, nargs="*", help="override the sequence lengths")
    parser.add_argument("--backend", choices=("torch", "triton"),
                        help="our ops' backend (default: triton on GPU, torch on CPU; triton on CPU is interpreted)")
    parser.add_argument("--cases", nargs="*", help="time only the cases whose name contains one of these")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu")
    if args.cpu and args.backend == "triton":
        # read when @triton.jit decorates the kernels: the ops import them only on the first call
        os.environ["TRITON_INTERPRET"] = "1"
    device = "cpu" if args.cpu else "cuda"
    shape = CPU_SHAPE if args.cpu else GPU_SHAPE
    dtype = torch.float32 if args.cpu else torch.bfloat16
    lengths = args.lengths or (CPU_LENGTHS if args.cpu else GPU_LENGTHS)
    rows = run(device, lengths, shape, dtype, args.backend, args.cases)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    interpreted = ", Triton interpreted" if args.cpu and args.backend == "triton" else ""
    header = (f"B={shape['batch']}, H={shape['heads']}, D={shape['dim']}, {str(dtype).removeprefix('torch.')}, "
              f"window {WINDOW_SIZE}; median ms; {machine}{interpreted}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print("\n" + header + "\n\n" + table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"kernels_{device}.json").write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    plot(rows, args.out / f"kernels_{device}.png", device.upper())
    print(f"\nwrote {args.out / f'kernels_{device}.json'} and .png")


if __name__ == "__main__":
    main()
