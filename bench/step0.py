"""Step-0 quality of each `attention.init` for the delta-rule students: the demo model with every layer
converted and no training, news perplexity, KL and top-1 agreement against the teacher, one markdown table.

    python bench/step0.py                                          # gated_delta, kda, gated_delta_window x 3 inits
    python bench/step0.py --mechanisms gated_delta --inits calibrated --set attention.delta_rope=true

Each row builds the student as a stage does (`linearize.surgery.calibrate` for `calibrated`) and
evaluates it on the first `--sequences` held-out sequences of the demo config.
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

SECTION_TITLE = "## Step-0 perplexity by init (bench/step0.py)"


def measure(mechanism: str, init: str, extra: list[str], sequences: int) -> dict:

    from linearize.adapters import teacher_view
    from linearize.data import build_datasets
    from linearize.train import seed_everything
    from linearize.train.evaluation import compare_on_tokens
    from linearize.surgery import calibrate
    from linearize.train.student import load_converted
    from stages.config_loader import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"attention.mechanism={mechanism}", f"attention.init={init}", *extra])
    seed_everything(cfg.seed)
    model, tokenizer = load_converted(cfg)
    train_tokens, held_out = build_datasets(cfg.data, tokenizer, cfg.seed)
    started = time.time()
    calibrate(model, train_tokens, cfg.attention.init)
    seconds = time.time() - started
    result = compare_on_tokens(model, held_out[:sequences], teacher_view=teacher_view)
    return {"mechanism": mechanism, "init": init, "set": " ".join(extra), "calibration_s": seconds, **result}


def table(rows: list[dict], args) -> str:
    tokens = rows[0]["tokens"] if rows else 0
    lines = [SECTION_TITLE, "",
             f"SmolLM2-135M-Instruct (float32), every layer converted, no training; the first {args.sequences} "
             f"× 512 held-out tokens of `demo-news` ({tokens:,} tokens); {time.strftime('%Y-%m-%d')}, "
             f"{torch.get_num_threads()} torch thread(s).", "",
             "| mechanism | init | overrides | student ppl | teacher ppl | KL | top-1 | calibration s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mechanism']} | {r['init']} | {r['set'] or '–'} | {r['student_ppl']:,.1f} | "
                     f"{r['teacher_ppl']:.1f} | {r['kl']:.2f} | {r['top1_agreement']:.3f} | {r['calibration_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mechanisms", nargs="+", default=["gated_delta", "kda", "gated_delta_window"])
    parser.add_argument("--inits", nargs="+", default=["calibrated", "zero_gate", "copy"])
    parser.add_argument("--sequences", type=int, default=4, help="held-out 512-token sequences to evaluate")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every row")
    parser.add_argument("--write", type=Path, help="markdown file to put the table in")
    args = parser.parse_args()
    rows = []
    for mechanism in args.mechanisms:
        for init in args.inits:
            rows.append(measure(mechanism, init, args.set, args.sequences))
            print(f"{mechanism} {init}: student ppl {rows[-1]['student_ppl']:,.1f}", flush=True)
    publish(table(rows, args), args.write, SECTION_TITLE, "# Step-0 perplexity\n\n")


if __name__ == "__main__":
    main()
