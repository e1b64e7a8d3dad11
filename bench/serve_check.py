"""A native export (`linearize export RUN OUT --format qwen3_5`) in serving engines, on a GPU: vLLM's offline
`LLM` and, where installed, SGLang's offline `Engine`. For each engine it checks greedy tokens against
transformers' load of the same folder, then measures output tokens/s at batch 1, 16 and 256 for the export
and for the teacher, side by side in one process.

    python bench/serve_check.py EXPORT_DIR --teacher TEACHER_DIR
    python bench/serve_check.py EXPORT_DIR --teacher TEACHER_DIR --engines vllm,sglang --write docs/serving.md

TEACHER_DIR is an HF folder of the teacher (for the embedded SmolLM2: `scripts/check_llamacpp.sh --teacher
DIR` writes one). Needs vllm (and sglang for that engine); without vllm it exits with one line. Throughput:
every row of a batch gets a random prompt of --prompt-tokens and decodes --new-tokens with EOS ignored,
so all rows run the full length; tokens/s = batch x new tokens / wall time of one generate call (after a
warm-up call), median of --repeats.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECTION_TITLE = "## vLLM and SGLang on GPU (bench/serve_check.py)"
PAGE_HEADER = "# Serving\n\n"
PROMPTS = ["The capital of France is", "Write a short poem about the sea.\n",
           "def fibonacci(n):\n    ", "Photosynthesis is the process by which"]
# Each engine keeps a share of the GPU for its weights and cache; two are alive at most while switching.
GPU_MEMORY_SHARE = 0.4


@dataclass
class Engine:
    """An offline engine: `generate(prompts_ids, new_tokens)` returns greedy token ids per prompt."""
    generate: Callable[[list[list[int]], int], list[list[int]]]
    close: Callable[[], None]


def open_vllm(path: str, dtype: str, max_len: int) -> Engine:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype=dtype, seed=0, max_model_len=max_len, gpu_memory_utilization=GPU_MEMORY_SHARE,
              trust_remote_code=False)

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outs]

    def close() -> None:
        nonlocal llm
        del llm
        _free_gpu()

    return Engine(generate, close)


def open_sglang(path: str, dtype: str, max_len: int) -> Engine:
    import sglang

    engine = sglang.Engine(model_path=path, dtype=dtype, random_seed=0, context_length=max_len,
                           mem_fraction_static=GPU_MEMORY_SHARE, trust_remote_code=False)

    def generate(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}
        return [list(out["output_ids"]) for out in engine.generate(input_ids=prompts, sampling_params=params)]

    def close() -> None:
        engine.shutdown()
        _free_gpu()

    return Engine(generate, close)


# name -> (module that must be importable, opener)
ENGINES: dict[str, tuple[str, Callable[[str, str, int], Engine]]] = {
    "vllm": ("vllm", open_vllm),
    "sglang": ("sglang", open_sglang),
}


def _free_gpu() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def transformers_greedy(path: str, dtype: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The reference: transformers' own load of the folder (no remote code), greedy, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), trust_remote_code=False)
    model = model.to("cuda").eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids], device="cuda")  # [1, T]
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                                 min_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id or 0)
            out.append(gen[0, len(ids):].tolist())
    del model
    _free_gpu()
    return out


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def throughput(engine: Engine, vocab: int, batch: int, prompt_tokens: int, new_tokens: int, repeats: int) -> float:
    import random

    rng = random.Random(batch)
    # Ids above the special-token range; speed does not depend on which tokens they are.
    prompts = [[rng.randrange(100, vocab) for _ in range(prompt_tokens)] for _ in range(batch)]
    engine.generate(prompts[:1], 4)  # warm-up: graph capture and allocation happen on the first calls
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.generate(prompts, new_tokens)
        rates.append(batch * new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", help="native export folder (config.json model_type qwen3_5_text)")
    ap.add_argument("--teacher", required=True, help="HF folder of the teacher, for the speed comparison")
    ap.add_argument("--engines", default="vllm,sglang", help=f"comma list from {sorted(ENGINES)}; "
                    "engines that are not installed are skipped (vllm is required)")
    ap.add_argument("--dtype", default="bfloat16", help="dtype for every engine and the reference")
    ap.add_argument("--batches", default="1,16,256")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--check-tokens", type=int, default=32, help="greedy tokens compared with transformers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", type=Path, help="put the table into this docs page (its own section)")
    args = ap.parse_args()

    if importlib.util.find_spec("vllm") is None:
        sys.exit("serve_check: vllm is not installed (pip install vllm on a CUDA machine); nothing checked")
    import torch

    if not torch.cuda.is_available():
        sys.exit("serve_check: no CUDA device; vLLM and SGLang need one")
    unknown = [name for name in args.engines.split(",") if name not in ENGINES]
    if unknown:
        sys.exit(f"serve_check: unknown engine(s) {unknown}; known: {sorted(ENGINES)}")
    engines = [name for name in args.engines.split(",") if importlib.util.find_spec(ENGINES[name][0])]

    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.export)
    vocab = AutoConfig.from_pretrained(args.export).vocab_size
    prompts = [tok(text, add_special_tokens=False).input_ids for text in PROMPTS]
    max_len = args.prompt_tokens + args.new_tokens + 64
    reference = transformers_greedy(args.export, args.dtype, prompts, args.check_tokens)
    batches = [int(b) for b in args.batches.split(",")]

    rows, failures = [], []
    for name in engines:
        opener = ENGINES[name][1]
        speeds = {}
        for role, path in (("export", args.export), ("teacher", args.teacher)):
            engine = opener(path, args.dtype, max_len)
            if role == "export":
                got = engine.generate(prompts, args.check_tokens)
                diffs = [first_difference(ref, out) for ref, out in zip(reference, got)]
                same = sum(d is None for d in diffs)
                print(f"{name}: greedy {args.check_tokens} tokens equal to transformers for {same}/{len(prompts)} "
                      f"prompts (first differing step per prompt: {diffs})", flush=True)
                # A bf16 near-tie may flip a late token; a different first token means a wrong load.
                if any(d == 0 for d in diffs):
                    failures.append(f"{name}: first greedy token differs from transformers")
                rows.append((name, "greedy vs transformers", f"{same}/{len(prompts)} identical ({diffs})"))
            for batch in batches:
                speeds[(role, batch)] = throughput(engine, vocab, batch, args.prompt_tokens, args.new_tokens,
                                                   args.repeats)
                print(f"{name} {role} batch {batch}: {speeds[(role, batch)]:.0f} tok/s", flush=True)
            engine.close()
        for batch in batches:
            export, teacher = speeds[("export", batch)], speeds[("teacher", batch)]
            rows.append((name, f"batch {batch}", f"{export:.0f} tok/s vs teacher {teacher:.0f} ({export / teacher:.2f}x)"))

    section = (f"{SECTION_TITLE}\n\n{date.today()}, {torch.cuda.get_device_name()}, {args.dtype}, prompt "
               f"{args.prompt_tokens} + {args.new_tokens} new tokens, engines "
               + ", ".join(f"{n} {_version(ENGINES[n][0])}" for n in engines) + "\n\n"
               "| engine | measure | result |\n|---|---|---|\n"
               + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows))
    from bench._docs import publish

    publish(section, args.write, SECTION_TITLE, PAGE_HEADER)
    if failures:
        sys.exit("; ".join(failures))


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
