"""Block-wise attention transfer (attention_transfer.block_size): peak memory and time of stage 1, all at
once against block by block, on the demo model and on wide random models, and a model larger than the
process's memory limit converted under that limit.

Every case is one stage-1 run (`run_stages`, attention_transfer only) in its own process; its peak RSS is
that process's `ru_maxrss`, its time the stage's wall time (model loading and the hidden-state cache
included), its tokens the training tokens each layer saw. A memory cap is RLIMIT_AS (address space) set
on the process before it starts: an allocation beyond it fails inside the process.

    python bench/blockwise.py memory [--write docs/blockwise.md]   # peak RSS vs model size and block size
    python bench/blockwise.py cap [--write docs/blockwise.md]      # a wide model bigger than the cap
    python bench/blockwise.py speed [--write docs/blockwise.md]    # time per token on the demo model
    python bench/blockwise.py cache [--write docs/blockwise.md]    # cached block inputs against recomputed
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._docs import publish  # noqa: E402

DOC_HEADER = "# Block-wise attention transfer\n"
DEMO_MODEL = "smollm2-135m-instruct"
WORK = REPO / "checkpoints" / "bench_blockwise"
GIB = 2**30
KIB = 1024
# A small byte-level BPE vocabulary keeps the wide models' embeddings negligible beside their layers.
WIDE_VOCAB = 256
WIDE_SEQ_LEN = 128
DEMO_SEQ_LEN = 256
# The wide random models: (layers, hidden, intermediate, heads); fp32, untied embeddings.
WIDE_MODELS = {"wide-1g": (4, 2048, 8192, 16), "wide-2g": (8, 2048, 8192, 16), "wide-5g": (20, 2048, 8192, 16)}
INIT_STD = 0.02  # the usual initializer_range: activations stay finite through a random stack


# ---------------------------------------------------------------------------------------------- assets


def _tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer of WIDE_VOCAB tokens trained on the demo corpus (saved once)."""
    if (folder / "tokenizer.json").is_file():
        return folder
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from linearize.data import loading

    texts = loading.load_texts("demo-wiki", "text")[:200]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=WIDE_VOCAB, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return folder


def write_wide_model(folder: Path, layers: int, hidden: int, intermediate: int, heads: int) -> Path:
    """A random Llama written one layer per safetensors shard (never the whole model in memory), with the
    bench tokenizer beside it."""
    import torch
    from linearize.files import save_safetensors, write_json
    from transformers import AutoConfig, AutoModelForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("llama", vocab_size=WIDE_VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                  max_position_embeddings=1024, tie_word_embeddings=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: t.shape for name, t in skeleton.state_dict().items()}
    groups = [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append([n for n in shapes if not n.startswith("model.layers.")])
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, names in enumerate(groups):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if n.endswith("norm.weight")
                       else torch.randn(shapes[n], generator=generator) * INIT_STD) for n in names}
        save_safetensors(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
    write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map}, indent=None)
    config.save_pretrained(folder)
    _tokenizer(folder)
    return folder


def weights_gib(model_dir: Path) -> float:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) / GIB


# ---------------------------------------------------------------------------------------------- one case


def _case_config(case: dict) -> dict:
    """The run config (dict) of one stage-1 case."""
    steps = case.get("steps", 4)
    return {
        "run_name": case["name"], "output_dir": str(WORK / "runs"), "seed": 0, "stages": ["attention_transfer"],
        "model": {"path": case["model"]},
        "data": {"train": "demo-wiki", "eval": "demo-news", "seq_len": case["seq_len"], "max_eval_sequences": 2},
        "attention_transfer": {"max_steps": steps, "save_every": steps, "eval_every": steps, "eval_sequences": 2,
                               "block_size": case["block_size"], "cache_gb": case.get("cache_gb", 64.0)},
    }


def run_case(case: dict) -> None:
    """In the case's own process: stage 1 from scratch, then one JSON line of measurements."""
    import shutil

    import torch

    from stages.config_loader import config_from_dict
    from stages.pipeline import run_stages

    torch.set_num_threads(case.get("threads", 1))
    shutil.rmtree(WORK / "runs" / case["name"], ignore_errors=True)
    started = time.perf_counter()
    metrics = run_stages(config_from_dict(_case_config(case), "bench"))["attention_transfer"]
    seconds = time.perf_counter() - started
    shutil.rmtree(WORK / "runs" / case["name"], ignore_errors=True)
    print(json.dumps({"seconds": seconds, "tokens": metrics["tokens"],
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB}))


def measure(case: dict, cap_gib: float | None = None) -> dict:
    """Runs `case` in a fresh process (under an RLIMIT_AS of cap_gib when given); its measurements, or
    {"failed": last error line}."""
    def limit():
        if cap_gib is not None:
            cap = int(cap_gib * GIB)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, OMP_NUM_THREADS=str(case.get("threads", 1)), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, __file__, "_case", json.dumps(case)], capture_output=True, text=True,
                          preexec_fn=limit, env=env, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        errors = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line] or ["?"]
        return {"failed": errors[-1].strip().replace(f"{WORK}/", "")[:160], "returncode": done.returncode}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------- tables


def _machine(threads: int) -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs (load varies), torch threads "
            f"{threads}, {datetime.date.today().isoformat()}")


def _fmt_rss(result: dict) -> str:
    return f"{result['peak_rss_mib'] / KIB:.2f}" if "peak_rss_mib" in result else f"failed ({result['failed']})"


def memory_table(block_sizes: dict) -> str:
    """Peak RSS of stage 1 per model and block size."""
    rows = []
    for model, (path, seq_len, sizes) in block_sizes.items():
        for k in sizes:
            result = measure({"name": f"mem-{model}-{k}", "model": str(path), "seq_len": seq_len, "block_size": k})
            rows.append(f"| {model} | {weights_gib(_model_dir(path)):.2f} | {k or 'all at once'} | {_fmt_rss(result)} |")
            print(rows[-1], flush=True)
    return ("## Peak memory of stage 1 (bench/blockwise.py memory)\n\n"
            f"{_machine(1)}. 4 steps of one sequence, fp32, window_linear + hedgehog; peak RSS of the stage's "
            "process (teacher loading, hidden-state cache pass and training included).\n\n"
            "| model | weights GiB | block_size | peak RSS GiB |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _model_dir(path) -> Path:
    from linearize.models.teacher import resolve_model_path

    return Path(resolve_model_path(str(path)))


def cap_table(model: str, cap_gib: float) -> str:
    """The wide model under an address-space cap below its weights: all at once fails, K=1 converts."""
    path = write_wide_model(WORK / model, *WIDE_MODELS[model])
    rows = []
    for k in (0, 1):
        result = measure({"name": f"cap-{model}-{k}", "model": str(path), "seq_len": WIDE_SEQ_LEN, "block_size": k},
                         cap_gib=cap_gib)
        seconds = f"{result['seconds']:.0f}" if "seconds" in result else "-"
        rows.append(f"| {k or 'all at once'} | {_fmt_rss(result)} | {seconds} |")
        print(rows[-1], flush=True)
    return ("## A model larger than the memory limit (bench/blockwise.py cap)\n\n"
            f"{_machine(1)}. `{model}`: a random Llama, {WIDE_MODELS[model][0]} layers, hidden "
            f"{WIDE_MODELS[model][1]}, intermediate {WIDE_MODELS[model][2]}, fp32, "
            f"**{weights_gib(path):.2f} GiB of weights**, under **RLIMIT_AS = {cap_gib:g} GiB** (the process's whole "
            "address space: code, libraries, thread stacks and heap). 4 steps of one sequence per block.\n\n"
            "| block_size | peak RSS GiB | stage s |\n|---|---|---|\n" + "\n".join(rows) + "\n")


def speed_table(repeats: int, steps: int, seq_len: int) -> str:
    """Stage-1 time per token on the demo model: all at once, block-wise with the cache, block-wise
    recomputing every block input (cache_gb=0), side by side, `repeats` rounds."""
    cases = {"all at once": {"block_size": 0}, "block_size=6, cached inputs": {"block_size": 6},
             "block_size=6, cache_gb=0 (recomputed)": {"block_size": 6, "cache_gb": 0.0}}
    times: dict[str, list[float]] = {name: [] for name in cases}
    tokens = {}
    for _ in range(repeats):
        for name, extra in cases.items():
            result = measure({"name": "speed", "model": DEMO_MODEL, "seq_len": seq_len, "steps": steps, "threads": 2,
                              **extra})
            if "seconds" in result:
                times[name].append(result["seconds"])
                tokens[name] = result["tokens"]
            print(name, result, flush=True)
    base = statistics.median(times["all at once"])
    rows = [f"| {name} | {statistics.median(t):.1f} | {1e3 * statistics.median(t) / tokens[name]:.1f} | "
            f"{statistics.median(t) / base:.2f} |" for name, t in times.items() if t]
    return ("## Stage-1 time per token (bench/blockwise.py speed)\n\n"
            f"{_machine(2)}. SmolLM2-135M (30 layers), fp32, seq_len {seq_len}, {steps} steps of one sequence, "
            f"median of {repeats} rounds run side by side; the stage's wall time (model loading, cache pass, "
            "checkpoints included) over the tokens each layer trained on.\n\n"
            "| run | stage s | ms per token | vs all at once |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def cache_table(seq_len: int, rows: int, repeats: int, block_size: int = 6) -> str:
    """The hidden-state cache against recomputing, on the demo model: the inputs of the last block of
    `block_size` layers for one sequence, read back from the cache (every pass after the first) or
    recomputed through the teacher layers below it (the first pass, and every pass with cache_gb=0);
    medians over `repeats` round-robin rounds of `rows` sequences."""
    import shutil

    import torch

    from linearize.models.lazy import LazyDecoder, SafetensorsReader
    from stages.blockwise import layer_blocks
    from linearize.train.hidden_cache import BlockInputs, HiddenCache, plan_cache

    torch.set_num_threads(2)
    reader = SafetensorsReader.for_model(_model_dir(DEMO_MODEL))
    lazy = LazyDecoder(reader, torch.float32)
    hidden, layers = lazy.config.hidden_size, lazy.num_layers
    ids = torch.randint(0, lazy.config.vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    shutil.rmtree(WORK / "cachepass", ignore_errors=True)
    cache = HiddenCache(WORK / "cachepass", ids, torch.float32, {"bench": DEMO_MODEL})
    blocks = layer_blocks(layers, block_size)
    plan = plan_cache([b[0] for b in blocks], rows, seq_len, hidden, torch.float32, 10**15)
    started = time.perf_counter()
    cache.build(LazyDecoder(reader, torch.float32), blocks, plan, batch_size=1, autocast="none",
                device=torch.device("cpu"))
    build_s = time.perf_counter() - started
    last = blocks[-1][0]
    prefix = LazyDecoder(reader, torch.float32)
    prefix.load(range(last))
    ways = {"read from the cache": BlockInputs(cache, last, None, None, torch.float32, hidden),
            "recomputed (first pass, cache_gb=0)": BlockInputs(cache, None, prefix, lazy.embedding_weight(),
                                                               torch.float32, hidden)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, inputs in ways.items():
            for row in range(rows):
                started = time.perf_counter()
                inputs(ids[row:row + 1])
                times[name].append(time.perf_counter() - started)
    shutil.rmtree(WORK / "cachepass", ignore_errors=True)
    cached, recomputed = (statistics.median(t) * 1e3 for t in times.values())
    return ("## Cached against recomputed block inputs (bench/blockwise.py cache)\n\n"
            f"{_machine(2)}. SmolLM2-135M, fp32, seq_len {seq_len}, block_size {block_size}: the inputs of the last "
            f"block (layer {last}) for one sequence; median of {repeats} rounds of {rows} sequences. Writing the "
            f"cache (every boundary, {rows} sequences) took {build_s:.1f} s.\n\n"
            "| block input | ms per sequence |\n|---|---|\n"
            f"| read from the cache | {cached:.2f} |\n| recomputed (first pass, cache_gb=0) | {recomputed:.1f} |\n\n"
            f"Every pass after the first reads its inputs {recomputed / cached:.0f}× faster than recomputing them.\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "cap", "speed", "cache", "_case"])
    parser.add_argument("case", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, help="put the table into this markdown file")
    parser.add_argument("--cap-gib", type=float, default=2.5)
    parser.add_argument("--cap-model", default="wide-5g", choices=list(WIDE_MODELS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=DEMO_SEQ_LEN)
    args = parser.parse_args(argv)
    if args.what == "_case":
        return run_case(json.loads(args.case))
    if args.what == "memory":
        models = {"SmolLM2-135M": (DEMO_MODEL, DEMO_SEQ_LEN, [0, 1, 6, 30])}
        for name in ("wide-1g", "wide-2g"):
            models[name] = (write_wide_model(WORK / name, *WIDE_MODELS[name]), WIDE_SEQ_LEN, [0, 1, 2])
        section, title = memory_table(models), "## Peak memory of stage 1"
    elif args.what == "cap":
        section, title = cap_table(args.cap_model, args.cap_gib), "## A model larger than the memory limit"
    elif args.what == "cache":
        section, title = cache_table(args.seq_len, 4, args.repeats), "## Cached against recomputed block inputs"
    else:
        section, title = speed_table(args.repeats, args.steps, args.seq_len), "## Stage-1 time per token"
    publish(section, args.write, title, DOC_HEADER)


if __name__ == "__main__":
    main()
