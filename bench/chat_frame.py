"""What keeps the chat frame in view past the window: LoRA variants from one finished transfer student.

    python bench/chat_frame.py --from checkpoints/demo --out checkpoints/chat_frame
    python bench/chat_frame.py --from checkpoints/demo --out checkpoints/chat_frame --variants kl_wiki mix_long

Every variant starts from the same attention-transfer student (the `--from` run's stage-1 folder is copied,
the source run is only read), runs the demo's LoRA stage with its own overrides and the evaluate stage with
the same behaviour settings, and reports closeness (news KL, top-1), retrieval (passkey, badge) and
agreement with the teacher short and after documents of 4 and 16 windows (first-token KL beside it).
Variants that train on teacher samples reuse the first variant's samples when their settings match (the
samples are made once, by the teacher, and their folder records the settings).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The teacher source as these variants use it: instructions through the chat template, most of them after a
# document, answers of at most 96 tokens; 6,144 generated tokens cover the 30 LoRA steps' teacher share.
TEACHER = ["data.teacher_samples.tokens=6144", "data.teacher_samples.max_new_tokens=96",
           "data.teacher_samples.chat_share=1.0", "data.teacher_samples.long_share=0.7",
           "data.teacher_samples.context_tokens=[192,400]"]
MIX_LONG = ["data.mix=[{source: teacher, weight: 0.5}, {source: demo-wiki, weight: 0.5}]", *TEACHER]
MIX_RECALL = ["data.mix=[{source: teacher, weight: 0.4}, {source: recall, weight: 0.2}, {source: demo-wiki, weight: 0.4}]",
              *TEACHER]
# SmolLM2's template opens every prompt with a ~30-token system turn: 32 sinks keep it in every window.
SINKS32 = ["attention.sink_tokens=32"]

# training at the evaluation's length: LoRA on 1,024-token rows, most of them a long document (600-900 tokens)
# then an instruction answered by the teacher, so the linear branch's mass at those lengths is trained against
# the teacher's answer; the same 15,360 LoRA tokens (15 steps), evaluated at 512 as the rest
LONG1024 = ["data.seq_len=1024", "lora_recovery.max_steps=15", "lora_recovery.save_every=15", "lora_recovery.eval_every=15",
            "data.mix=[{source: teacher, weight: 0.7}, {source: demo-wiki, weight: 0.3}]",
            "data.teacher_samples.tokens=2048", "data.teacher_samples.max_new_tokens=96",
            "data.teacher_samples.chat_share=1.0", "data.teacher_samples.long_share=0.8",
            "data.teacher_samples.context_tokens=[600,900]", *SINKS32]

VARIANTS = {
    "kl_wiki": [],  # the demo's LoRA stage as it is: KL to the teacher on the Wikipedia slice
    "kl_wiki_sinks32": SINKS32,
    "mix_long": MIX_LONG,
    "mix_long_sinks32": [*MIX_LONG, *SINKS32],
    # the documents are measured in windows: 2 and 8 windows of 128 are the same 256 and 1,024 tokens
    "mix_long_window128": [*MIX_LONG, "attention.window_size=128", "evaluate.behaviour.context_windows=[2,8]"],
    "mix_recall": MIX_RECALL,
    "long1024_sinks32": LONG1024,
    # the decayed linear branch (attention.linear_half_life): keys older than a few half-lives stop counting
    "kl_wiki_sinks32_hl64": [*SINKS32, "attention.linear_half_life=64"],
    # both: the decay bounds the linear mass, so rows where a document fills most of the context can now teach
    # the student to answer after it (without the decay these rows changed nothing after 1,024 tokens)
    "long1024_sinks32_hl64": [*LONG1024, "attention.linear_half_life=64"],
}
# Variants whose LoRA stage trains at another length than the evaluation's: their evaluate stage runs on
# its own with these overrides, so that every row's news KL is measured on the same 512-token sequences.
EVAL_APART = {name: ["data.seq_len=512"] for name in ("long1024_sinks32", "long1024_sinks32_hl64")}
# The setting every variant starts from: the demo as these rows were measured (4 sinks and no linear decay;
# configs/demo.yaml has had 32 sinks and a half-life of 64 since), so that `kl_wiki` stays the baseline the
# sinks32 and hl64 variants are compared against.
BASE = ["attention.sink_tokens=4", "attention.linear_half_life=null"]
# The same behaviour evaluation for every variant: the demo's, plus agreement after 4 windows (256 tokens)
# and closeness on code and the manual (8 sequences each: a taste, as the demo's retrieval is).
EVALUATE = ["evaluate.behaviour.context_windows=[4,16]", "evaluate.behaviour.texts=[news,code,manual]",
            "evaluate.behaviour.text_sequences=8"]


def _stage1_items(run) -> list[Path]:
    """What a LoRA-only variant needs of the source run: its marker, config, teacher record and stage 1
    (not its lock, nor its later stages)."""
    return [run.marker, run.config, run.teacher_record, run.stage("attention_transfer").path]


def _copy(item: Path, target: Path) -> None:
    if item.exists() and not target.exists():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, target)


def _copy_stage1(source: Path, dest: Path) -> None:
    from stages.rundir import RunDir

    dest.mkdir(parents=True, exist_ok=True)
    for item in _stage1_items(RunDir(source)):
        _copy(item, dest / item.name)


def _teacher_settings(name: str) -> list[str]:
    return sorted(o for o in VARIANTS.get(name, []) if o.startswith("data.teacher_samples."))


def _reuse_samples(out: Path, dest: Path) -> None:
    """Copies an earlier variant's teacher samples into `dest` if it has none and that variant asked for the
    same teacher settings (the run refuses a samples folder recorded with other settings)."""
    from stages.rundir import RunDir

    target = RunDir(dest).teacher_samples
    for other in sorted(p for p in out.iterdir() if p != dest):
        samples = RunDir(other).teacher_samples
        if _teacher_settings(other.name) == _teacher_settings(dest.name) and samples.is_dir() and any(samples.iterdir()):
            _copy(samples, target)
            return


def run_variant(name: str, source: Path, out: Path, config: str) -> float:
    from stages.rundir import RunDir

    dest = out / name
    _copy_stage1(source, dest)
    overrides = VARIANTS[name]
    lora = RunDir(source).stage("lora_recovery")
    if not overrides and lora.done.exists():  # the source's own LoRA stage is this variant's: reuse it
        _copy(lora.path, dest / lora.path.name)
    if any("source: teacher" in o for o in overrides):
        _reuse_samples(out, dest)
    base = [str(REPO / ".venv/bin/linearize"), "run", config, f"run_name={name}", f"output_dir={out}"]
    started = time.time()
    # every variant is a student of the same teacher on the same prompts: its measurements are made once
    cache = f"evaluate.behaviour.teacher_cache={json.dumps(str(out / 'teacher_cache'))}"
    common = [*BASE, *EVALUATE, cache, *overrides, "--accept-changes"]
    apart = name in EVAL_APART
    subprocess.run([*base, "stages=[lora_recovery]" if apart else "stages=[lora_recovery,evaluate]", *common], check=True)
    if apart:
        subprocess.run([*base, "stages=[evaluate]", *common[:-1], *EVAL_APART[name], "--accept-changes"], check=True)
    return time.time() - started


def row(name: str, run: Path, seconds: float) -> str:
    from stages.rundir import RunDir

    ev = json.loads(RunDir(run).stage("evaluate").eval.read_text())
    kinds, ret, agree = ev["texts"], ev["retrieval"], ev["teacher_agreement"]
    news = kinds["news"]
    long_keys = sorted((k for k in agree if k != "0"), key=int)
    cells = [name, f"{news['ppl_ratio']:.3f}", " / ".join(f"{kinds[k]['kl']:.3f}" for k in ("news", "code", "manual") if k in kinds),
             f"{news['top1_agreement']:.3f}",
             f"{ret['passkey']['student']['mean_accuracy']:.2f}", f"{ret['badge']['student']['mean_exact']:.2f}",
             f"{agree['0']['match_share']:.2f}"]
    cells += [f"{agree[k]['match_share']:.2f} ({agree[k]['mean_prefix']:.1f})" for k in long_keys]
    cells += [" / ".join(f"{agree[k]['first_kl']:.2f}" for k in ["0", *long_keys]), f"{seconds / 60:.1f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, required=True, help="a run whose attention_transfer finished")
    parser.add_argument("--out", type=Path, required=True, help="folder for the variant runs")
    parser.add_argument("--config", default=str(REPO / "configs/demo.yaml"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    from stages.rundir import RunDir

    if not RunDir(args.source).stage("attention_transfer").done.exists():
        raise SystemExit(f"error: {args.source} has no finished attention_transfer stage")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants:
        seconds = run_variant(name, args.source, args.out, args.config)
        rows.append(row(name, args.out / name, seconds))
        print("\n".join(rows), flush=True)
    header = ("| variant | news ppl × teacher | KL news / code / manual | news top-1 | passkey @512 | badge @512 | agreement short | "
              "agreement after 256 tokens (prefix) | after 1,024 tokens (prefix) | first-token KL short / 256 / 1,024 | "
              "LoRA + eval min |")
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
