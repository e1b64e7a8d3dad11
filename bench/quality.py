"""Quality at a fixed token budget: every preset and both baselines through `linearize compare`, trained on
the demo Wikipedia slice and evaluated on held-out news (`lee_background.cor`) and the other kinds of
text `compare` knows, one markdown table.

`linearize compare` sets the budget (`--transfer-tokens` of attention transfer and `--lora-tokens` of
LoRA, one sequence per optimizer step; presets without an attention-transfer stage get the LoRA budget
only) and writes compare.md / compare.json / compare.png under `--output-dir`. This script runs the
presets `--parallel` at a time (one `compare` process per preset, `--threads` torch threads each), then
one `compare` over all presets that finished, which only collects: finished runs and their measurements
are reused. Runs are resumable: rerunning picks up where an interrupted table stopped.

    python bench/quality.py                                  # all presets, 2 at a time, 1 thread each
    python bench/quality.py --presets lolcats liger --write docs/quality.md
    python bench/quality.py --presets lolcats_sinks lolcats_sinks_auto3 --transfer-tokens 41472 --lora-tokens 99840
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._docs import publish  # noqa: E402
from stages.rundir import CompareDir  # noqa: E402

PRESETS = ["lolcats", "hedgehog_linear", "lawcat", "liger", "liger_window", "baseline_window_only",
           "baseline_no_transfer", "gated_delta", "kda", "gated_delta_window"]
# The quality experiments beyond the presets (sinks, automatic softmax layers, KL-only LoRA, ...): one
# config per row, named after its file.
RECIPES = sorted(path.stem for path in (REPO / "bench" / "recipes").glob("*.yaml"))
SECTION_TITLE = "## Quality at a fixed budget (bench/quality.py)"


def config_path(row: str) -> Path:
    """A row's config: configs/<row>.yaml for a preset, bench/recipes/<row>.yaml for a recipe."""
    return REPO / "configs" / f"{row}.yaml" if row in PRESETS else REPO / "bench" / "recipes" / f"{row}.yaml"


def compare_command(args, presets: list[str]) -> list[str]:
    """`linearize compare` over `presets` with this script's budget and overrides."""
    return [sys.executable, "-m", "stages.cli", "compare", *(str(config_path(p)) for p in presets),
            "--out", args.output_dir, "--transfer-tokens", str(args.transfer_tokens),
            "--lora-tokens", str(args.lora_tokens), "--eval-sequences", str(args.eval_sequences),
            "--text-sequences", str(args.text_sequences), "--stage-eval-sequences", str(args.stage_eval_sequences),
            f"data.seq_len={args.seq_len}", *args.set]


def run_preset(args, preset: str) -> int:
    """One preset's run and measurements, logged to <output-dir>/<preset>.log; returns the exit status."""
    log = Path(args.output_dir) / f"{preset}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    started = time.time()
    with open(log, "a") as out:
        rc = subprocess.run(compare_command(args, [preset]), cwd=REPO, env=env, stdout=out,
                            stderr=subprocess.STDOUT).returncode
    print(f"{preset}: rc={rc} in {(time.time() - started) / 60:.1f} min (log {log})", flush=True)
    return rc


def section(args, failed: list[str]) -> str:
    """compare.md under this script's heading, with the presets that failed."""
    body = CompareDir(args.output_dir).markdown.read_text().split("\n", 1)[1]  # without its own title
    notes = [f"Failed: {', '.join(f'{p} (see {Path(args.output_dir) / p}.log)' for p in failed)}."] if failed else []
    return "\n".join([SECTION_TITLE, body.rstrip("\n"), *notes]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=PRESETS, choices=PRESETS + RECIPES, metavar="ROW",
                        help="rows: preset names (configs/) or recipe names (bench/recipes/); default: every preset")
    parser.add_argument("--transfer-tokens", type=int, default=83_000)
    parser.add_argument("--lora-tokens", type=int, default=58_000)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-sequences", type=int, default=80, help="held-out news sequences for perplexity")
    parser.add_argument("--text-sequences", type=int, default=20, help="sequences of each other kind of text")
    parser.add_argument("--stage-eval-sequences", type=int, default=8,
                        help="held-out sequences for each stage's own final eval loss (cheap sanity check)")
    parser.add_argument("--parallel", type=int, default=2, help="presets run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--output-dir", default=str(REPO / "checkpoints" / "quality"))
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    parser.add_argument("--write", type=Path, help="markdown file to put the table in")
    args = parser.parse_args()
    with ThreadPoolExecutor(args.parallel) as pool:
        codes = dict(zip(args.presets, pool.map(lambda p: run_preset(args, p), args.presets)))
    finished = [p for p in args.presets if codes[p] == 0]
    failed = [p for p in args.presets if codes[p] != 0]
    if not finished:
        raise SystemExit(f"every preset failed: see the logs under {args.output_dir}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads * args.parallel))
    subprocess.run(compare_command(args, finished), cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    publish(section(args, failed), args.write, SECTION_TITLE, "# Quality\n\n")


if __name__ == "__main__":
    main()
