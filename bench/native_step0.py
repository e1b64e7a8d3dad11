"""Step 0 of the native form (`attention.native_family: qwen3_5`) against today's gated_delta: the demo
model with the same softmax layers kept, every other layer converted and calibrated, no training; news
perplexity, KL and top-1 agreement against the teacher, and the calibration's mean relative output error
(per head, ‖y − ŷ‖ / ‖y‖ of the fitted layer output, averaged over heads and layers). One markdown table.

    python bench/native_step0.py                                   # softmax layers [4, 8, 10]
    python bench/native_step0.py --softmax-layers 8 18 20 --sequences 4

Each row builds the student as a stage does (`load_converted`, then `linearize.surgery.calibrate` on the
first training rows) from configs/qwen3_5_native.yaml at `data.seq_len=512`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._docs import publish  # noqa: E402

SECTION_TITLE = "## Native form at step 0 (bench/native_step0.py)"
# form name -> the overrides that build it from the native preset
FORMS = {"gated_delta": ["attention.native_family=null"], "native qwen3_5": []}


def measure(form: str, softmax_layers: list[int], extra: list[str], sequences: int) -> dict:
    from linearize.adapters import teacher_view
    from linearize.data import build_datasets
    from linearize.surgery import calibrate
    from linearize.train import seed_everything
    from linearize.train.evaluation import compare_on_tokens
    from linearize.train.student import load_converted
    from stages.config_loader import load_config

    overrides = ["data.seq_len=512", f"attention.softmax_layers=[{','.join(map(str, softmax_layers))}]",
                 *FORMS[form], *extra]
    cfg = load_config(REPO / "configs" / "qwen3_5_native.yaml", overrides)
    seed_everything(cfg.seed)
    model, tokenizer = load_converted(cfg)
    train_tokens, held_out = build_datasets(cfg.data, tokenizer, cfg.seed)
    started = time.time()
    record = calibrate(model, train_tokens, cfg.attention.init)
    seconds = time.time() - started
    errors = [e for layer in record["layers"].values() for e in layer["relative_error"]]
    result = compare_on_tokens(model, held_out[:sequences], teacher_view=teacher_view)
    return {"form": form, "set": " ".join(extra), "calibration_s": seconds,
            "fit_error": sum(errors) / len(errors), **result}


def table(rows: list[dict], args) -> str:
    tokens = rows[0]["tokens"] if rows else 0
    lines = [SECTION_TITLE, "",
             f"SmolLM2-135M-Instruct (float32), softmax layers {args.softmax_layers}, every other layer converted, "
             f"`init: calibrated` on 1,024 training tokens, no training; the first {args.sequences} × 512 held-out "
             f"tokens of `demo-news` ({tokens:,} tokens); {time.strftime('%Y-%m-%d')}, "
             f"{torch.get_num_threads()} torch thread(s).", "",
             "| form | overrides | student ppl | teacher ppl | KL | top-1 | calib. fit error | calibration s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['form']} | {r['set'] or '–'} | {r['student_ppl']:,.1f} | {r['teacher_ppl']:.1f} | "
                     f"{r['kl']:.2f} | {r['top1_agreement']:.3f} | {r['fit_error']:.3f} | {r['calibration_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    parser.add_argument("--softmax-layers", nargs="+", type=int, default=[4, 8, 10])
    parser.add_argument("--sequences", type=int, default=4, help="held-out 512-token sequences to evaluate")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every row")
    parser.add_argument("--write", type=Path, help="markdown file to put the table in")
    args = parser.parse_args()
    rows = []
    for form in args.forms:
        rows.append(measure(form, args.softmax_layers, args.set, args.sequences))
        print(f"{form}: student ppl {rows[-1]['student_ppl']:,.1f}, fit error {rows[-1]['fit_error']:.3f}", flush=True)
    publish(table(rows, args), args.write, SECTION_TITLE, "# Native form at step 0\n\n")


if __name__ == "__main__":
    main()
