"""Attention-kernel timings: our ops against fla's Triton kernels (when importable) and torch SDPA causal,
forward and forward + backward, over sequence length. Two suites (`--suite`):

- `attention` (default): linear, gated linear, window + linear. GPU: B=4, H=16, D=128, bf16,
  T ∈ {1K … 32K}. CPU: B=1, H=4, D=64, fp32, T ∈ {256 … 2K}.
- `delta`: the gated delta rule with a per-head decay (Gated DeltaNet) and a per-key-channel decay (KDA)
  next to window + linear, at SmolLM2-135M's head shapes (9 query heads over 3 kv heads, D=64, Hedgehog
  features 2 × 64). GPU: B=4, bf16, T ∈ {4K, 8K, 16K}, against fla's `chunk_gated_delta_rule` /
  `chunk_kda`. CPU: B=1, fp32, T ∈ {512, 2K}.

GPU: medians of `triton.testing.do_bench`; our ops run with backend="triton". CPU (`--cpu`): our torch
chunk forms and SDPA, medians of `time.perf_counter` repeats. `--cpu --backend triton` runs our Triton
kernels under the interpreter (TRITON_INTERPRET=1, set before any kernel module is imported): not a speed
of the kernels on a GPU, but a like-for-like check that a kernel change did not add work. A case whose
backend does not exist yet (a UserError) is reported as skipped.

    python bench/kernels.py                # GPU
    python bench/kernels.py --cpu          # CPU, prints a markdown table
    python bench/kernels.py --cpu --backend triton --cases linear_attn --lengths 64 256
    python bench/kernels.py --suite delta  # GPU: ours vs fla chunk_gated_delta_rule / chunk_kda
Writes `<out>/kernels_<device>.json` and `.png` (`kernels_delta_<device>.*` for the delta suite; out defaults
to .cache/linearize/bench).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from linearize.errors import UserError  # noqa: E402
from linearize.files import save_figure, write_json  # noqa: E402
from linearize.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: E402
from linearize.ops.gated_linear_attn import chunk_gated_linear_attn  # noqa: E402
from linearize.ops.linear_attn import chunk_linear_attn  # noqa: E402
from linearize.ops.window_linear_attn import window_linear_attn  # noqa: E402

GPU_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
GPU_SHAPE = dict(batch=4, heads=16, kv_heads=16, dim=128, features=128)
CPU_LENGTHS = [256, 512, 1024, 2048]
CPU_SHAPE = dict(batch=1, heads=4, kv_heads=4, dim=64, features=64)
# SmolLM2-135M: 9 query heads over 3 kv heads, head dim 64; its students' Hedgehog maps give 2 × 64 features.
SMOLLM2_HEADS = dict(heads=9, kv_heads=3, dim=64, features=128)
DELTA_GPU_LENGTHS = [4096, 8192, 16384]
DELTA_GPU_SHAPE = dict(batch=4, **SMOLLM2_HEADS)
DELTA_CPU_LENGTHS = [512, 2048]
DELTA_CPU_SHAPE = dict(batch=1, **SMOLLM2_HEADS)
WINDOW_SIZE = 64  # the LoLCATs default window
DEMO_HALF_LIFE = 64.0  # configs/demo.yaml's attention.linear_half_life
LIGER_GATE_DIVISOR = 16  # Liger's g = logsigmoid(k) / 16
CPU_REPEATS = 5
MS_PER_S = 1000.0


def make_inputs(batch, seq_len, heads, kv_heads, dim, features, dtype, device):
    """q `[B, T, H, D]`, k, v `[B, T, H_kv, D]` (positive q/k, as a feature map gives), fq, fk
    `[B, T, H, F]`, g ≤ 0 `[B, T, H_kv, D]`, window_logit `[H]`; for the delta rule (whose mechanisms
    L2-normalize q and k) qn, kn, beta ∈ (0, 1) `[B, T, H_kv]`, and log-decays g_head `[B, T, H_kv]`
    (Gated DeltaNet) and g_chan `[B, T, H_kv, D]` (KDA)."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, fn=torch.rand):
        return fn(*shape, generator=gen, device=device, dtype=torch.float32)

    q_shape, kv_shape = (batch, seq_len, heads, dim), (batch, seq_len, kv_heads, dim)
    f_shape = (batch, seq_len, heads, features)
    tensors = dict(
        q=rand(*q_shape), k=rand(*kv_shape), v=rand(*kv_shape, fn=torch.randn),
        fq=rand(*f_shape), fk=rand(*f_shape),
        qn=F.normalize(rand(*q_shape, fn=torch.randn), dim=-1),
        kn=F.normalize(rand(*kv_shape, fn=torch.randn), dim=-1),
    )
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    # gates stay fp32, as the mechanisms hand them to the ops (log-decays go into cumulative sums)
    tensors.update(
        g=F.logsigmoid(rand(*kv_shape, fn=torch.randn)) / LIGER_GATE_DIVISOR,
        g_head=F.logsigmoid(rand(*kv_shape[:3], fn=torch.randn)) / LIGER_GATE_DIVISOR,
        g_chan=F.logsigmoid(rand(*kv_shape, fn=torch.randn)) / LIGER_GATE_DIVISOR,
        beta=torch.sigmoid(rand(*kv_shape[:3], fn=torch.randn)),
        window_logit=torch.zeros(heads, device=device),
    )
    return tensors


def _ours(backend: str) -> dict[str, Callable]:
    return {
        "linear_attn": lambda x: chunk_linear_attn(x["q"], x["k"], x["v"], backend=backend)[0],
        "gated_linear_attn": lambda x: chunk_gated_linear_attn(x["q"], x["k"], x["v"], x["g"], backend=backend)[0],
        "window_linear_attn": lambda x: window_linear_attn(
            x["q"], x["k"], x["v"], x["fq"], x["fk"], x["window_logit"], window_size=WINDOW_SIZE, backend=backend
        )[0],
        # the decayed linear branch the demo trains with (attention.linear_half_life: 64)
        "window_linear_attn half-life 64": lambda x: window_linear_attn(
            x["q"], x["k"], x["v"], x["fq"], x["fk"], x["window_logit"], window_size=WINDOW_SIZE, backend=backend,
            linear_half_life=DEMO_HALF_LIFE,
        )[0],
    }


def _ours_delta(backend: str) -> dict[str, Callable]:
    return {
        "gated_delta_rule per-head g": lambda x: chunk_gated_delta_rule(
            x["qn"], x["kn"], x["v"], x["g_head"], x["beta"], backend=backend)[0],
        "gated_delta_rule per-channel g": lambda x: chunk_gated_delta_rule(
            x["qn"], x["kn"], x["v"], x["g_chan"], x["beta"], backend=backend)[0],
        "window_linear_attn": _ours(backend)["window_linear_attn"],
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


def _to_query_heads(x, *names):
    """fla's delta-rule kernels have no query-side GQA (one state per query head): k, v, g, beta are copied
    from H_kv to H heads inside the timed call, as an fla user of this layout would; fla then keeps H
    states where our op keeps H_kv."""
    group = x["qn"].shape[2] // x["kn"].shape[2]
    return [x[name].repeat_interleave(group, dim=2) for name in names]  # [B, T, H, ...]


def _fla_delta_cases() -> dict[str, Callable]:
    """fla's `chunk_gated_delta_rule` and `chunk_kda` when fla imports (GPU only), and our op's
    `backend="fla"` adapter (the same kernels behind our layout) beside them; else nothing."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn
        from fla.ops.kda import chunk_kda
    except ImportError:
        return {}
    found = {f"ours {name} (fla adapter)": fn for name, fn in _ours_delta("fla").items() if "delta" in name}
    found["fla chunk_gated_delta_rule"] = lambda x: fla_gdn(
        x["qn"], *_to_query_heads(x, "kn", "v", "g_head", "beta"))[0]
    found["fla chunk_kda"] = lambda x: chunk_kda(x["qn"], *_to_query_heads(x, "kn", "v", "g_chan", "beta"))[0]
    return found


def _sdpa(x):
    q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))  # [B, H, T, D], k and v [B, H_kv, T, D]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)  # [B, T, H, D]


@dataclass(frozen=True)
class Suite:
    """What one run times: our ops by backend, fla's counterparts (GPU), and the shapes per device."""

    ours: Callable[[str], dict[str, Callable]]
    fla: Callable[[], dict[str, Callable]]
    cpu_shape: dict
    cpu_lengths: list[int]
    gpu_shape: dict
    gpu_lengths: list[int]


SUITES = {
    "attention": Suite(_ours, _fla_cases, CPU_SHAPE, CPU_LENGTHS, GPU_SHAPE, GPU_LENGTHS),
    "delta": Suite(_ours_delta, _fla_delta_cases, DELTA_CPU_SHAPE, DELTA_CPU_LENGTHS, DELTA_GPU_SHAPE,
                   DELTA_GPU_LENGTHS),
}


def cases(device: str, suite: Suite, backend: str | None = None, only: list[str] | None = None) -> dict[str, Callable]:
    """Timed closures by name; `only` keeps the names containing one of its strings."""
    backend = backend or ("triton" if device == "cuda" else "torch")
    found = {f"ours {name} ({backend})": fn for name, fn in suite.ours(backend).items()}
    if device == "cuda":
        found.update(suite.fla())
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


def _median_ms_cpu(step: Callable, repeats: int = CPU_REPEATS) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * MS_PER_S


def _median_ms_gpu(step: Callable) -> float:
    import triton.testing

    return triton.testing.do_bench(step, return_mode="median")


def run(device: str, suite: Suite, lengths: list[int], shape: dict, dtype, backend=None, only=None,
        repeats: int = CPU_REPEATS) -> list[dict]:
    timer = _median_ms_gpu if device == "cuda" else (lambda step: _median_ms_cpu(step, repeats))
    rows = []
    for seq_len in lengths:
        inputs = make_inputs(seq_len=seq_len, dtype=dtype, device=device, **shape)
        for name, fn in cases(device, suite, backend, only).items():
            row = dict(case=name, seq_len=seq_len)
            try:
                for mode, make_step in (("fwd", lambda f=fn: (lambda: f(inputs))),
                                        ("fwd+bwd", lambda f=fn: _with_backward(f, inputs))):
                    try:
                        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                            row[mode] = timer(make_step())
                    except torch.OutOfMemoryError:
                        row[mode] = math.nan
                        torch.cuda.empty_cache()
            except UserError as err:  # a backend this op does not have yet
                print(f"T={seq_len:6d} {name:38s} skipped: {err}", flush=True)
                continue
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
            cells = [f"{lookup[(name, t)][mode]:.2f}" if (name, t) in lookup else "–" for t in lengths]
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
    save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="small CPU shapes, torch backends, perf_counter medians")
    parser.add_argument("--suite", choices=tuple(SUITES), default="attention", help="which ops and shapes")
    parser.add_argument("--repeats", type=int, default=CPU_REPEATS, help="CPU: timed repeats after a warm-up")
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
    suite = SUITES[args.suite]
    shape = suite.cpu_shape if args.cpu else suite.gpu_shape
    dtype = torch.float32 if args.cpu else torch.bfloat16
    lengths = args.lengths or (suite.cpu_lengths if args.cpu else suite.gpu_lengths)
    rows = run(device, suite, lengths, shape, dtype, args.backend, args.cases, args.repeats)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    interpreted = ", Triton interpreted" if args.cpu and args.backend == "triton" else ""
    repeats = f"median of {args.repeats} after a warm-up" if args.cpu else "do_bench median"
    header = (f"B={shape['batch']}, H={shape['heads']}, H_kv={shape['kv_heads']}, D={shape['dim']}, "
              f"F={shape['features']}, {str(dtype).removeprefix('torch.')}, window {WINDOW_SIZE}; {repeats}, ms; {machine}{interpreted}; "
              f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print("\n" + header + "\n\n" + table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{device}" if args.suite == "attention" else f"kernels_{args.suite}_{device}"
    write_json(args.out / f"{stem}.json", dict(header=header, rows=rows), indent=1)
    plot(rows, args.out / f"{stem}.png", f"{device.upper()} {args.suite}")
    print(f"\nwrote {args.out / f'{stem}.json'} and .png")


if __name__ == "__main__":
    main()
