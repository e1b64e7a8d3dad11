"""Passkey retrieval of finished runs at several context lengths, exact match and digits in place, with
the teacher on the same prompts and keys, as one markdown table.

    python bench/passkey.py checkpoints/quality13/lolcats_sinks checkpoints/quality13/gated_delta_window_sinks
    python bench/passkey.py RUN... --lengths 512 1024 2048 --trials 4 --write docs/quality.md

Each run's final student (its last stage's parameters plus the LoRA adapter) is built as the evaluate stage
builds it, read-only: nothing is written under the run directories. Every model sees the same prompts
(same seed), so the rows are comparable cell by cell.
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

SECTION_TITLE = "## Passkey retrieval by context length (bench/passkey.py)"


def _student(run_dir: Path):
    """The run's final student and tokenizer, and its config, without touching the run directory."""
    from stages.config_loader import load_config
    from stages.evaluate import final_student
    from stages.rundir import RunDir
    from stages.registry import TRAINING_STAGES

    run = RunDir(run_dir)
    if not run.is_run():
        raise SystemExit(f"error: {run_dir} is not a run directory (no {run.config.name})")
    # Checked before building: a run with no trained stage would be calibrated afresh, which writes.
    if not any(run.stage(stage).path.is_dir() for stage in TRAINING_STAGES):
        raise SystemExit(f"error: {run_dir} has no trained student (no training stage folder)")
    cfg = load_config(run.config)
    start = final_student(cfg, run_dir)
    return start.model.eval(), start.tokenizer, start.cfg


def _row(name: str, result: dict, seconds: float) -> dict:
    return {"name": name, "accuracy": result["accuracy"], "digits": result["digit_accuracy"],
            "mean": result["mean_accuracy"], "mean_digits": result["mean_digit_accuracy"], "seconds": seconds}


def measure(runs: list[Path], lengths: list[int], depths: list[float], trials: int, teacher: bool = True) -> list[dict]:
    from linearize.adapters import teacher_view
    from linearize.evals.passkey import passkey_retrieval

    rows = []
    for i, run_dir in enumerate(runs):
        model, tokenizer, cfg = _student(run_dir)
        if i == 0 and teacher:  # the teacher is the same weights in teacher mode; once is enough
            started = time.time()
            with teacher_view(model):
                result = passkey_retrieval(model, tokenizer, lengths, depths, trials, seed=cfg.seed)
            rows.append(_row("teacher", result, time.time() - started))
            print(f"teacher: exact {result['mean_accuracy']:.2f}, digits {result['mean_digit_accuracy']:.2f}", flush=True)
        started = time.time()
        result = passkey_retrieval(model, tokenizer, lengths, depths, trials, seed=cfg.seed)
        rows.append(_row(run_dir.name, result, time.time() - started))
        print(f"{run_dir.name}: exact {result['mean_accuracy']:.2f}, digits {result['mean_digit_accuracy']:.2f}",
              flush=True)
        del model
    return rows


def table(rows: list[dict], args) -> str:
    cells = [f"{length}" for length in args.lengths]
    lines = [SECTION_TITLE, "",
             f"Needle depths {', '.join(f'{d:g}' for d in args.depths)}; {args.trials} random 5-digit keys per "
             f"(length, depth) cell, the same keys for every row; greedy decoding. Each cell: exact-match accuracy / "
             f"digits in place (about 0.1 by guessing), averaged over the depths. {time.strftime('%Y-%m-%d')}, "
             f"{torch.get_num_threads()} torch thread(s).", "",
             "| model | " + " | ".join(f"@{c}" for c in cells) + " | mean | seconds |",
             "|---" * (len(cells) + 3) + "|"]
    for r in rows:
        per_length = [f"{sum(a) / len(a):.2f} / {sum(d) / len(d):.2f}" for a, d in zip(r["accuracy"], r["digits"])]
        lines.append(f"| {r['name']} | " + " | ".join(per_length)
                     + f" | {r['mean']:.2f} / {r['mean_digits']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (e.g. a compare's rows)")
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 1024, 2048], help="prompt lengths in tokens")
    parser.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.5, 1.0], help="needle depths in [0, 1]")
    parser.add_argument("--trials", type=int, default=4, help="random keys per (length, depth) cell")
    parser.add_argument("--no-teacher", action="store_true", help="students only (to add rows to a measured table)")
    parser.add_argument("--write", type=Path, help="markdown file to put the table in")
    args = parser.parse_args()
    rows = measure(args.runs, args.lengths, args.depths, args.trials, teacher=not args.no_teacher)
    publish(table(rows, args), args.write, SECTION_TITLE, "# Passkey retrieval\n\n")


if __name__ == "__main__":
    main()
