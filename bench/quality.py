"""Quality at a fixed token budget: every preset and both baselines, trained on the demo Wikipedia
slice and evaluated on held-out news (`lee_background.cor`), one markdown table.

Each preset runs through the normal CLI (`linearize run configs/<preset>.yaml ...`) with overrides that
set the budget: `--transfer-tokens` of attention transfer and `--lora-tokens` of LoRA, at
`--seq-len` tokens per sequence and one sequence per optimizer step. Presets without an
attention-transfer stage (Liger, the baselines) get the LoRA budget only. Runs are resumable: rerunning
skips finished stages, so an interrupted table picks up where it stopped.

    python bench/quality.py                                  # all presets, 2 at a time, 1 thread each
    python bench/quality.py --presets lolcats liger --write docs/quality.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._docs import publish  # noqa: E402

PRESETS = ["lolcats", "hedgehog_linear", "lawcat", "liger", "liger_window", "baseline_window_only",
           "baseline_no_transfer", "gated_delta", "kda", "gated_delta_window"]
SECTION_TITLE = "## Quality at a fixed budget (bench/quality.py)"


def overrides(args, preset: str) -> list[str]:
    seq = args.seq_len
    return [
        f"run_name={preset}", f"output_dir={args.output_dir}", f"data.seq_len={seq}",
        f"data.max_eval_sequences={args.eval_sequences}", f"evaluate.max_sequences={args.eval_sequences}",
        # The preset's own stages without export: the table needs eval.json only.
        f"stages=[{','.join(s for s in stages_of(preset) if s != 'export')}]",
        # One sequence per optimizer step: at ~100-160 steps, accumulating 8 would leave 15-20 updates.
        f"attention_transfer.max_steps={args.transfer_tokens // seq}", "attention_transfer.grad_accum=1",
        # The recipe's plateau scheduler needs many evaluations; cosine decays over the short budget instead.
        "attention_transfer.scheduler=cosine",
        f"attention_transfer.eval_every={args.transfer_tokens // seq}",
        f"attention_transfer.save_every={max(args.transfer_tokens // seq // 2, 1)}",
        f"attention_transfer.eval_sequences={args.stage_eval_sequences}",
        f"lora_recovery.max_steps={args.lora_tokens // seq}", "lora_recovery.grad_accum=1",
        f"lora_recovery.eval_every={args.lora_tokens // seq}", f"lora_recovery.save_every={max(args.lora_tokens // seq // 2, 1)}",
        f"lora_recovery.eval_sequences={args.stage_eval_sequences}",
        *args.set,
    ]


def run_preset(args, preset: str) -> dict:
    log = Path(args.output_dir) / f"{preset}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "stages.cli", "run", str(REPO / "configs" / f"{preset}.yaml"),
           *overrides(args, preset)]
    started = time.time()
    with open(log, "a") as out:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    result = {"preset": preset, "rc": done.returncode, "minutes": (time.time() - started) / 60, "log": str(log)}
    eval_file = Path(args.output_dir) / preset / "evaluate" / "eval.json"
    if done.returncode == 0 and eval_file.exists():
        result.update(json.loads(eval_file.read_text()))
    print(f"{preset}: rc={done.returncode} in {result['minutes']:.1f} min "
          f"{'ppl %.2f' % result['student_ppl'] if 'student_ppl' in result else ''}", flush=True)
    return result


def stages_of(preset: str) -> list[str]:
    from stages.config_loader import load_config

    return list(load_config(REPO / "configs" / f"{preset}.yaml").stages)


def table(results: list[dict], args) -> str:
    teacher = next((r["teacher_ppl"] for r in results if "teacher_ppl" in r), None)
    lines = [SECTION_TITLE, "",
             f"SmolLM2-135M-Instruct teacher, float32, {args.seq_len}-token sequences, one sequence per step; "
             f"budget {args.transfer_tokens:,} tokens of attention transfer + {args.lora_tokens:,} of LoRA "
             f"(presets without a transfer stage: LoRA only); held-out news perplexity on "
             f"{args.eval_sequences} × {args.seq_len} tokens of `lee_background.cor`; "
             f"{time.strftime('%Y-%m-%d')}, 2-core CPU, {args.threads} thread(s) per run.", "",
             "| preset | stages | student ppl | × teacher | KL | top-1 agreement | passkey (student / teacher) | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        stages = ", ".join(s for s in stages_of(r["preset"]) if s in ("attention_transfer", "lora_recovery"))
        if "student_ppl" not in r:
            lines.append(f"| {r['preset']} | {stages} | failed (rc {r['rc']}, see {r['log']}) | | | | | |")
            continue
        ratio = f"{r['student_ppl'] / teacher:.3f}" if teacher else "–"
        lines.append(f"| {r['preset']} | {stages} | {r['student_ppl']:.2f} | {ratio} | {r['kl']:.3f} | "
                     f"{r['top1_agreement']:.3f} | {passkey(r)} | {r['minutes']:.0f} |")
    lines += ["", f"Teacher perplexity on the same tokens: {teacher:.2f}." if teacher else ""]
    return "\n".join(lines) + "\n"




def passkey(result: dict) -> str:
    """Mean passkey accuracy of student and teacher, when `evaluate.long_context.passkey_lengths` was set."""
    scores = [result.get(key, {}).get("passkey", {}).get("mean_accuracy") for key in ("long_context", "long_context_teacher")]
    return " / ".join("–" if s is None else f"{s:.2f}" for s in scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS)
    parser.add_argument("--transfer-tokens", type=int, default=83_000)
    parser.add_argument("--lora-tokens", type=int, default=58_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-sequences", type=int, default=80, help="held-out news sequences for perplexity")
    parser.add_argument("--stage-eval-sequences", type=int, default=8,
                        help="held-out sequences for each stage's own final eval loss (cheap sanity check)")
    parser.add_argument("--parallel", type=int, default=2, help="presets run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--output-dir", default=str(REPO / "checkpoints" / "quality"))
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    parser.add_argument("--write", type=Path, help="markdown file to put the table in")
    args = parser.parse_args()
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda p: run_preset(args, p), args.presets))
    text = table(results, args)
    publish(text, args.write, SECTION_TITLE, "# Quality\n\n")


if __name__ == "__main__":
    main()
