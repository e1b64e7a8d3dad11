"""Decode speed and memory against context length, teacher vs students: prefill a random context of
each length with a cache, then time greedy decode steps (one token each, the cache carried along).

Times: for each context length one process builds every model, prefills each, and times decode steps
round-robin (one step of each model per round, median over rounds), so load from other processes on a
shared machine hits all models alike: compare the ratios within one context. Memory: the cache's size
after prefill (KV cache for the teacher; recurrent state, window keys/values and softmax layers' KV for
students), in total and per sequence (one row of the batch), and, with `--rss`, each case's peak RSS alone
in its own process (weights and prefill included).

    python bench/generate.py                                   # 1K–8K, prints a markdown table
    python bench/generate.py --contexts 1024,2048 --rss --write docs/export.md --png docs/generate.png
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._docs import publish  # noqa: E402
from linearize.files import save_figure, write_json  # noqa: E402

MODEL = "smollm2-135m-instruct"
TEACHER = "teacher"
DEFAULT_CONTEXTS = "1024,2048,4096,8192"
DEFAULT_MECHANISMS = "window_linear,liger,linear,gated_delta,kda,gated_delta_window"
# liger needs a parameter-free feature map that keeps the head dim (attention/liger.py).
MECHANISM_OVERRIDES = {"liger": {"feature_map": "softmax_dim"}, "liger_window": {"feature_map": "softmax_dim"}}
SECTION_TITLE = "## Decode speed and memory vs context (bench/generate.py)"
KIB_PER_MIB = 1024
BYTES_PER_MIB = 2**20
WARMUP_STEPS = 2  # untimed decode steps first: the first calls pay one-off allocation costs


def build(case: str, dtype: str):
    """The teacher, or the teacher converted to mechanism `case` (untrained student parameters: speed
    and memory do not depend on their values)."""
    import linearize
    from linearize.config.schema import AttentionConfig, ModelConfig
    from linearize.models.teacher import load_teacher

    model, _ = load_teacher(ModelConfig(path=MODEL, dtype=dtype))
    if case != TEACHER:
        linearize.linearize_model(model, AttentionConfig(mechanism=case, **MECHANISM_OVERRIDES.get(case, {})))
    return model.eval()


def _step(model, token: torch.Tensor, cache) -> torch.Tensor:
    """One greedy decode step: token `[1, 1]` → the next token `[1, 1]`."""
    return model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)


def widen(cache, token: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeats a batch-1 prefill `batch` times in place (every row then holds the same context): one
    prefill instead of `batch`; returns the next tokens `[batch, 1]`."""
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    return token.expand(batch, 1).contiguous()  # [batch, 1]


@torch.no_grad()
def measure_context(cases: list[str], context: int, new_tokens: int, dtype: str, batch: int = 1) -> list[dict]:
    """Prefill every case's model with the same random context, then time decode steps round-robin."""
    from transformers import DynamicCache

    from linearize.attention import cache_nbytes

    models = {case: build(case, dtype) for case in cases}
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(0))  # [1, L]
    runs, results = {}, {}
    for case, model in models.items():
        cache = DynamicCache(config=model.config)
        started = time.perf_counter()
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits  # [1, L, V]
        prefill = time.perf_counter() - started
        token = widen(cache, logits[:, -1:].argmax(-1), batch)  # [batch, 1]
        results[case] = {"case": case, "context": context, "batch": batch, "prefill_s": prefill,
                         "cache_mib": cache_nbytes(cache) / BYTES_PER_MIB}
        for _ in range(WARMUP_STEPS):
            token = _step(model, token, cache)
        runs[case] = [token, cache]
    steps = {case: [] for case in cases}
    for _ in range(new_tokens):
        for case, model in models.items():
            token, cache = runs[case]
            started = time.perf_counter()
            runs[case][0] = _step(model, token, cache)
            steps[case].append(time.perf_counter() - started)
    for case in cases:
        results[case]["decode_tok_s"] = batch / statistics.median(steps[case])  # tokens of all rows
    return [results[case] for case in cases]


@torch.no_grad()
def peak_rss_case(case: str, context: int, new_tokens: int, dtype: str, batch: int = 1) -> dict:
    """Peak RSS of one case alone in this process: load, prefill, `new_tokens` decode steps."""
    from transformers import DynamicCache

    model = build(case, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    token = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)  # [1, 1]
    token = widen(cache, token, batch)  # [batch, 1]
    for _ in range(new_tokens):
        token = _step(model, token, cache)
    return {"case": case, "context": context,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB}


def _spawn(args, *extra: str) -> list[dict]:
    cmd = [sys.executable, __file__, "--new-tokens", str(args.new_tokens), "--dtype", args.dtype,
           "--threads", str(args.threads), "--batch", str(args.batch), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(extra)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict], args) -> str:
    teacher = {r["context"]: r for r in results if r["case"] == TEACHER}
    lines = [SECTION_TITLE, "",
             f"SmolLM2-135M-Instruct, {args.dtype}, batch {args.batch} (one prefill repeated per row), untrained student parameters; decode: median of "
             f"{args.new_tokens} greedy steps after a prefill of the context, models interleaved per step; {platform.processor() or platform.machine()}, {args.threads} threads, "
             f"torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "| model | context | decode tokens/s | vs teacher | cache (MiB) | cache per sequence (MiB) | peak RSS (MiB) "
             "| prefill (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref = teacher.get(r["context"])
        ratio = f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}×" if ref else "–"
        rss = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else "–"
        lines.append(f"| {r['case']} | {r['context']} | {r['decode_tok_s']:.1f} | {ratio} | {r['cache_mib']:.2f} | "
                     f"{r['cache_mib'] / r['batch']:.2f} | {rss} | {r['prefill_s']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))  # its own canvas: matplotlib's global backend stays as it was
    FigureCanvasAgg(fig)
    speed, memory = fig.subplots(1, 2)
    for case in dict.fromkeys(r["case"] for r in results):
        rows = [r for r in results if r["case"] == case]
        contexts = [r["context"] for r in rows]
        speed.plot(contexts, [r["decode_tok_s"] for r in rows], marker="o", label=case)
        memory.plot(contexts, [r["cache_mib"] for r in rows], marker="o", label=case)
    for ax, label in ((speed, "decode tokens/s"), (memory, "cache after prefill (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    memory.set_yscale("log")
    speed.legend()
    fig.suptitle("SmolLM2-135M decode: teacher vs linearized students")
    fig.tight_layout()
    save_figure(fig, path)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help="internal: peak RSS of one case alone in this process (JSON)")
    parser.add_argument("--context", type=int, help="internal: the context of one process's measurement")
    parser.add_argument("--cases", help="internal: the cases one process times together")
    parser.add_argument("--contexts", default=DEFAULT_CONTEXTS, help="comma-separated context lengths")
    parser.add_argument("--mechanisms", default=DEFAULT_MECHANISMS, help="comma-separated student mechanisms")
    parser.add_argument("--new-tokens", type=int, default=16, help="timed decode steps per model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1,
                        help="rows decoded together; tokens/s counts every row (serving throughput)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rss", action="store_true", help="also measure each case's peak RSS alone (slow)")
    parser.add_argument("--write", type=Path, help="markdown file to put the table in")
    parser.add_argument("--png", type=Path, help="where to save the plot")
    parser.add_argument("--json", type=Path, help="where to save the raw results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(peak_rss_case(args.case, args.context, args.new_tokens, args.dtype, args.batch)))
        return
    if args.cases:
        print(json.dumps(measure_context(args.cases.split(","), args.context, args.new_tokens, args.dtype, args.batch)))
        return
    cases = [TEACHER, *args.mechanisms.split(",")]
    results = []
    for context in (int(c) for c in args.contexts.split(",")):
        rows = _spawn(args, "--cases", ",".join(cases), "--context", str(context))
        if args.rss:
            for row in rows:
                row.update(_spawn(args, "--case", row["case"], "--context", str(context)))
        results += rows
        print(json.dumps(rows), file=sys.stderr)
    results.sort(key=lambda r: (cases.index(r["case"]), r["context"]))
    section = table(results, args)
    publish(section, args.write, SECTION_TITLE, "# Exports\n")
    if args.png:
        plot(results, args.png)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
