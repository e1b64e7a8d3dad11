"""The native export on the real model: a native-form SmolLM2-135M-Instruct student exported with
`--format qwen3_5`, loaded by plain transformers (no trust_remote_code) in a fresh interpreter where
linearize cannot be imported, and compared with linearize's own model: fp32 logits on held-out news
tokens, greedy tokens, and the export's cached against uncached greedy decoding. One markdown table.

    python bench/native_export.py --run RUN_DIR      # a finished native run: `linearize export --format qwen3_5`
    python bench/native_export.py                    # no run: the preset's student at step 0 (calibrated)

The run should export in float32 (`export.dtype=float32`) for the logit comparison to mean parity; a bf16
export is compared too, its error is then the cast's. No pytest runs this: ~8 min on the shared 2-core box.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from linearize.models.standalone import BLOCK_LINEARIZE

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._docs import publish  # noqa: E402

SECTION_TITLE = "## Native export of the real model (bench/native_export.py)"
PROMPT = "The capital of France is"
NEW_TOKENS = 32
EVAL_ROWS, EVAL_LEN = 2, 128  # held-out news tokens compared logit by logit
# overrides of configs/qwen3_5_native.yaml for the step-0 student (no run): the bench's softmax layers
STEP0 = ["data.seq_len=512", "attention.softmax_layers=[4,8,10]"]

# Runs in `python -I` with linearize and stages blocked: what a user without linearize gets.
STANDALONE = BLOCK_LINEARIZE + textwrap.dedent("""
    import time
    import torch
    from transformers import AutoModelForCausalLM
    export, ids_file, out_file, new_tokens = sys.argv[1:]
    started = time.time()
    model, info = AutoModelForCausalLM.from_pretrained(export, output_loading_info=True, dtype=torch.float32)
    model.eval()
    load_s = time.time() - started
    data = torch.load(ids_file)
    greedy = dict(max_new_tokens=int(new_tokens), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(data["eval"], use_cache=False).logits
        started = time.time()
        cached = model.generate(data["prompt"], use_cache=True, **greedy)
        cached_s = time.time() - started
        uncached = model.generate(data["prompt"], use_cache=False, **greedy)
    torch.save({"logits": logits, "cached": cached, "uncached": uncached, "class": type(model).__name__,
                "load_s": load_s, "cached_s": cached_s,
                "missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"])}, out_file)
""")


def standalone(export: Path, eval_ids: torch.Tensor, prompt_ids: torch.Tensor, work: Path) -> dict:
    """The export loaded and run by plain transformers in a fresh `python -I` with linearize blocked."""
    torch.save({"eval": eval_ids, "prompt": prompt_ids}, work / "ids.pt")
    (work / "standalone.py").write_text(STANDALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", str(work / "standalone.py"), str(export), str(work / "ids.pt"),
                             str(work / "result.pt"), str(NEW_TOKENS)], cwd=work, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"standalone load failed:\n{result.stderr[-3000:]}")
    return torch.load(work / "result.pt")


def step0_student(overrides: list[str]):
    """(model, tokenizer, held-out tokens) of configs/qwen3_5_native.yaml with `overrides`, calibrated."""
    from linearize.data import build_datasets
    from linearize.surgery import calibrate
    from linearize.train import seed_everything
    from linearize.train.student import load_converted
    from stages.config_loader import load_config

    cfg = load_config(REPO / "configs" / "qwen3_5_native.yaml", overrides)
    seed_everything(cfg.seed)
    model, tokenizer = load_converted(cfg)
    train_tokens, held_out = build_datasets(cfg.data, tokenizer, cfg.seed)
    calibrate(model, train_tokens, cfg.attention.init)
    return model.eval(), tokenizer, held_out


def run_student(run_dir: Path):
    """(model, tokenizer, held-out tokens) of a finished run: its final student, as evaluation builds it."""
    from linearize.data import build_datasets
    from stages.config_loader import load_config
    from stages.evaluate import final_student
    from stages.rundir import RunDir

    cfg = load_config(RunDir(run_dir).config, [])
    start = final_student(cfg, run_dir)
    _, held_out = build_datasets(cfg.data, start.tokenizer, cfg.seed)
    return start.model.eval(), start.tokenizer, held_out


def compare(model, tokenizer, held_out: torch.Tensor, export: Path, work: Path) -> dict:
    """linearize's model against the export's standalone load: the comparison row."""
    eval_ids = held_out[:EVAL_ROWS, :EVAL_LEN]  # [rows, len]
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids  # [1, P]
    got = standalone(export, eval_ids, prompt_ids, work)
    with torch.no_grad():
        want = model(eval_ids, use_cache=False).logits.float()
        ours = model.generate(prompt_ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                              pad_token_id=tokenizer.pad_token_id or 0)
    config = (export / "config.json").read_text()
    return {"class": got["class"], "missing": got["missing"], "unexpected": got["unexpected"],
            "dtype": "bfloat16" if '"bfloat16"' in config else "float32",
            "max_abs_logit": float(want.abs().max()), "max_dlogit": float((got["logits"] - want).abs().max()),
            "top1_equal": float((got["logits"].argmax(-1) == want.argmax(-1)).float().mean()),
            "greedy_equal": bool(torch.equal(got["cached"], ours)),
            "cached_equal_uncached": bool(torch.equal(got["cached"], got["uncached"])),
            "text": tokenizer.decode(got["cached"][0, prompt_ids.shape[1]:]), "load_s": got["load_s"],
            "decode_tok_s": NEW_TOKENS / got["cached_s"]}


def export_run(run_dir: Path, out: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "linearize", "export", str(run_dir), str(out), "--format",
                             "qwen3_5"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"linearize export failed: {result.stderr.strip()}")


def table(row: dict, source: str) -> str:
    return "\n".join([
        SECTION_TITLE, "",
        f"{source}; exported with `--format qwen3_5` ({row['dtype']}), loaded by `AutoModelForCausalLM.from_pretrained` "
        f"in `python -I` with linearize blocked (fp32 compute); logits on {EVAL_ROWS} × {EVAL_LEN} held-out `demo-news` "
        f"tokens; greedy {NEW_TOKENS} tokens after \"{PROMPT}\"; {time.strftime('%Y-%m-%d')}, "
        f"{torch.get_num_threads()} torch thread(s), transformers' pure-torch Gated DeltaNet fallback.", "",
        "| loaded class | missing / unexpected keys | max \\|Δlogit\\| | max \\|logit\\| | top-1 equal | greedy = linearize's | "
        "cached = uncached | export decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| {row['class']} | {len(row['missing'])} / {len(row['unexpected'])} | {row['max_dlogit']:.2e} | "
        f"{row['max_abs_logit']:.1f} | {row['top1_equal']:.3f} | {row['greedy_equal']} | {row['cached_equal_uncached']} | "
        f"{row['decode_tok_s']:.1f} |", "",
        f"Greedy continuation (export, cached): {row['text']!r}", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished native-form run directory (default: step-0 student)")
    parser.add_argument("--keep", type=Path, help="write the export here and keep it (default: a temporary folder)")
    parser.add_argument("--write", type=Path, help="markdown file to put the table in")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export = args.keep or work / "export"
        if args.run:
            export_run(args.run, export)
            model, tokenizer, held_out = run_student(args.run)
            source = f"run `{args.run.name}` (SmolLM2-135M-Instruct, native gated_delta)"
        else:
            from linearize.models.families import qwen3_5

            model, tokenizer, held_out = step0_student(STEP0)
            qwen3_5.save(model, tokenizer, export, dtype="float32")
            source = "SmolLM2-135M-Instruct, native gated_delta, softmax layers [4, 8, 10], calibrated, no training"
        row = compare(model, tokenizer, held_out, export, work)
    publish(table(row, source), args.write, SECTION_TITLE, "# Native export\n\n")


if __name__ == "__main__":
    main()
