"""Stage throughput and memory: attention transfer (stage 1) against the teacher's plain forward, and
LoRA recovery on the converted model (stage 2) against LoRA on the unconverted teacher.

Peak RSS: every case runs alone in its own process. Time: all cases are built in one process and timed
round-robin, one step of each per round, median over `--steps` rounds after a warm-up, so a shared
machine's load drift affects every case alike (compare the ratios within one table).

    python bench/pipeline.py                      # prints a markdown table
    python bench/pipeline.py --write docs/performance.md
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
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._docs import publish  # noqa: E402

from linearize.config.schema import LoraRecoveryConfig, ModelConfig, RunConfig, TransferConfig  # noqa: E402

MODEL = "smollm2-135m-instruct"
SECTION_TITLE = "## Stage throughput (bench/pipeline.py)"
KIB_PER_MIB = 1024
# The memory targets compare every stage's peak with LoRA on the unconverted teacher.
MEMORY_REFERENCE = "teacher_lora_step"


def _batch(seq_len: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))  # [1, L]


def _config(dtype: str) -> RunConfig:
    return replace(RunConfig(), model=ModelConfig(path=MODEL, dtype=dtype))


def _training_step(model, loss_fn, stage_cfg):
    """A closure doing one optimizer step of `loss_fn` through the training engine."""
    from linearize.train import build_engine

    engine = build_engine(RunConfig().engine, model, stage_cfg)

    def step(batch):
        engine.model.train()
        loss_fn(engine.model, batch).backward()
        engine.step(stage_cfg.grad_clip)

    return step


def case_teacher_forward(cfg):
    from linearize.models.teacher import load_teacher

    model, _ = load_teacher(cfg.model)

    def step(batch):
        with torch.no_grad():
            model(input_ids=batch)

    return model, step


def case_transfer_step(cfg):
    import linearize
    from linearize.losses import transfer_objective
    from linearize.train.student import load_converted

    model, _ = load_converted(cfg)
    linearize.freeze_for_transfer(model)
    stage_cfg = TransferConfig()
    loss_fn = transfer_objective(stage_cfg.mse_factor, stage_cfg.attn_ce_weight)
    return model, _training_step(model, loss_fn, stage_cfg)


def _lora_step(model, **stage_overrides):
    import linearize
    from linearize import adapters
    from linearize.losses import recovery_objective

    stage_cfg = LoraRecoveryConfig(**stage_overrides)
    linearize.set_recompute(model, stage_cfg.recompute_attention)
    peft_model = adapters.wrap(model, rank=stage_cfg.rank, alpha=stage_cfg.alpha, dropout=stage_cfg.dropout,
                               targets=stage_cfg.targets, train_student=stage_cfg.train_student)
    return peft_model, _training_step(peft_model, recovery_objective(stage_cfg.kl_weight), stage_cfg)


def case_teacher_lora_step(cfg):
    from linearize.models.teacher import load_teacher

    return _lora_step(load_teacher(cfg.model)[0])


def case_student_lora_step(cfg):
    from linearize.train.student import load_converted

    return _lora_step(load_converted(cfg)[0])


def _compiled(cfg):
    return replace(cfg, attention=replace(cfg.attention, compile=True))


def case_transfer_step_compiled(cfg):
    return case_transfer_step(_compiled(cfg))


def case_student_lora_step_compiled(cfg):
    return case_student_lora_step(_compiled(cfg))


def case_student_lora_step_kept(cfg):
    from linearize.train.student import load_converted

    return _lora_step(load_converted(cfg)[0], recompute_attention=False)


CASES = {
    "teacher_forward": ("teacher forward (no grad)", case_teacher_forward),
    "transfer_step": ("stage 1: attention-transfer step", case_transfer_step),
    "transfer_step_compiled": ("stage 1, `attention.compile=true`", case_transfer_step_compiled),
    "teacher_lora_step": ("LoRA step on the unconverted teacher", case_teacher_lora_step),
    "student_lora_step": ("stage 2: LoRA step on the converted model", case_student_lora_step),
    "student_lora_step_kept": ("stage 2, `lora_recovery.recompute_attention=false`", case_student_lora_step_kept),
    "student_lora_step_compiled": ("stage 2, `attention.compile=true`", case_student_lora_step_compiled),
}


def peak_rss_case(name: str, seq_len: int, dtype: str) -> dict:
    """Builds case `name` alone in this process and runs two steps; returns the process's peak RSS."""
    model, step = CASES[name][1](_config(dtype))
    batch = _batch(seq_len, model.config.vocab_size)
    for _ in range(2):  # the second step holds optimizer state as well
        step(batch)
    return {"case": name, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB_PER_MIB}


def interleaved_times(seq_len: int, steps: int, dtype: str) -> dict[str, float]:
    """Median seconds per step of every case, timed round-robin (one step of each case per round) in
    one process, so load from other processes on a shared machine hits all cases alike."""
    built = {name: build(_config(dtype)) for name, (_, build) in CASES.items()}
    batches = {name: _batch(seq_len, model.config.vocab_size) for name, (model, _) in built.items()}
    for name, (_, step) in built.items():
        step(batches[name])  # warm-up
    times = {name: [] for name in CASES}
    for _ in range(steps):
        for name, (_, step) in built.items():
            started = time.perf_counter()
            step(batches[name])
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def _spawn(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--case", name, "--seq-len", str(args.seq_len), "--dtype", args.dtype,
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"case {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


NOTES = [
    "What a step contains: the teacher forward includes the LM head; the transfer step runs teacher and",
    "student attention in every layer with the per-layer MSE and backpropagates into the student parameters",
    "only (no LM head); the LoRA steps are forward + backward + AdamW with next-token cross-entropy",
    "(rank 8 on q/k/v/o); in stage 2 the student attention is recomputed in backward by default",
    "(`lora_recovery.recompute_attention`) to keep peak memory down; the `=false` row keeps its",
    "intermediates instead; the `attention.compile=true` rows run the student under torch.compile (compiled",
    "in the warm-up step, outside the timing; the compiler's own memory counts in their peak RSS). Peak RSS is the maximum of a process running that case alone, model loading",
    "included. Times are interleaved round-robin in one process; the machine is shared and noisy: compare",
    "the ratios within one table, not absolute numbers across tables.",
]


def table(results: list[dict], args) -> str:
    base = {r["case"]: r for r in results}
    reference = {"transfer_step": "teacher_forward", "student_lora_step": "teacher_lora_step",
                 "student_lora_step_kept": "teacher_lora_step", "transfer_step_compiled": "teacher_forward",
                 "student_lora_step_compiled": "teacher_lora_step"}
    lines = [SECTION_TITLE, "",
             f"SmolLM2-135M-Instruct, {args.dtype}, 1 × {args.seq_len} tokens, default attention config "
             f"({RunConfig().attention.mechanism}, {RunConfig().attention.feature_map}); "
             f"median of {args.steps} interleaved rounds; {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.", "",
             "| case | s/step | tokens/s | peak RSS (MiB) | time vs | peak RSS vs teacher LoRA |",
             "|---|---|---|---|---|---|"]
    for r in results:
        ref = reference.get(r["case"])
        ratio = f"{r['seconds'] / base[ref]['seconds']:.2f}× the time of {ref}" if ref in base else "–"
        ref_rss = base[MEMORY_REFERENCE]["peak_rss_mib"] if MEMORY_REFERENCE in base else None
        memory = f"{r['peak_rss_mib'] / ref_rss:.2f}×" if ref_rss else "–"
        lines.append(f"| {CASES[r['case']][0]} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {ratio} | {memory} |")
    return "\n".join(lines + [""] + NOTES) + "\n"




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=list(CASES), help="peak RSS of one case alone in this process (JSON)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (each times one step of every case)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps timings comparable on a shared machine)")
    parser.add_argument("--write", type=Path, help="markdown file to put the table in")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(peak_rss_case(args.case, args.seq_len, args.dtype)))
        return
    results = [_spawn(name, args) for name in CASES]
    seconds = interleaved_times(args.seq_len, args.steps, args.dtype)
    for result in results:
        result.update(seconds=seconds[result["case"]], tokens_per_s=args.seq_len / seconds[result["case"]])
    section = table(results, args)
    publish(section, args.write, SECTION_TITLE, "# Performance\n")


if __name__ == "__main__":
    main()
