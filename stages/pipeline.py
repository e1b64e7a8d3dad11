"""The run orchestration: `<output_dir>/<run_name>/` with the resolved config, the stages in order
(finished ones skipped, interrupted ones resumed from their last checkpoint), `report.md`, and a
closing summary (teacher and student perplexity, a generation from the export)."""
from __future__ import annotations

import shutil
from pathlib import Path

from linearize.train import distributed
from linearize.train import (check_same_config, clear_done, config_to_dict, latest_checkpoint, read_done,
                             verify_checkpoint)
from linearize.train.checkpoint import read_checkpoint_config
from linearize.train.report import write_report
from stages import attention_transfer, evaluate, export, lora_recovery

STAGES = {
    "attention_transfer": attention_transfer.run,
    "lora_recovery": lora_recovery.run,
    "evaluate": evaluate.run,
    "export": export.run,
}
RUN_CONFIG = "config.yaml"
SKIP, RUN = "skip", "run"
# Stages every rank runs together under engine.name=deepspeed; the others run on rank 0 while the
# rest wait, since they neither train nor need more than one process.
DISTRIBUTED_STAGES = ("attention_transfer", "lora_recovery")


def run_dir_of(cfg) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def _check_names(names) -> None:
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; valid: {', '.join(STAGES)}")


def _plan(stage_dir: Path, stage: str, config: dict, force: bool) -> str:
    """SKIP a finished stage whose config is unchanged; RUN otherwise. Refuses (UserError naming the
    keys) a changed config against a finished stage or a checkpoint, unless force."""
    done = read_done(stage_dir)
    if done is not None:
        changed = check_same_config(done["config"], config, stage, stage_dir / "DONE", force)
        return RUN if changed else SKIP
    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is not None:
        verify_checkpoint(checkpoint)
        check_same_config(read_checkpoint_config(checkpoint), config, stage, checkpoint, force)
    return RUN


def _discard_later_stages(run_dir: Path, stage: str) -> None:
    """Stages after one that just ran were built on its old output: delete them so they run afresh
    (in this invocation, or the next one that asks for them)."""
    order = list(STAGES)
    for later in order[order.index(stage) + 1:]:
        if (run_dir / later).exists():
            print(f"{later}: {stage} re-ran, so its previous results are stale; discarding them")
            shutil.rmtree(run_dir / later)


def _status(stage_dir: Path) -> str:
    checkpoint = latest_checkpoint(stage_dir)
    return f"resumed from {checkpoint.name}" if checkpoint is not None else "ran"


def _export_sample(cfg, run_dir: Path):
    """A greedy generation from the exported model, loaded back the way a user would load it."""
    from linearize.models.exported import load_export
    from linearize.train.evaluation import greedy_sample

    model_dir = export.export_dir(run_dir)
    if not model_dir.is_dir():
        return None
    model, tokenizer = load_export(model_dir)
    return greedy_sample(model, tokenizer, cfg.evaluate.sample_prompt, cfg.evaluate.sample_tokens)


def _print_summary(run_dir: Path, results: dict, sample, report: Path) -> None:
    evaluation = results.get("evaluate") or {}
    if evaluation:
        print(f"teacher perplexity {evaluation['teacher_ppl']:.3f}, student perplexity {evaluation['student_ppl']:.3f}")
    if sample is not None:
        print(f"export {export.export_dir(run_dir)} generates: {sample!r}")
    print(f"report: {report}")


def _runs_here(name: str, distributed_run: bool) -> bool:
    return not distributed_run or name in DISTRIBUTED_STAGES or distributed.is_main_process()


def run_stages(cfg, stage_names=None, force: bool = False) -> dict:
    """Runs `stage_names` (default cfg.stages) in order for `cfg`; returns stage → final metrics.
    Under engine.name=deepspeed every launched rank calls this: training stages run on all ranks, the
    rest (and every shared file: config, report, summary) on rank 0 only."""
    from stages.config_loader import save_resolved

    names = list(stage_names or cfg.stages)
    _check_names(names)
    distributed_run = cfg.engine.name == "deepspeed"
    if distributed_run:
        distributed.init()
    main = distributed.is_main_process()
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config_to_dict(cfg)
    plan = {name: _plan(run_dir / name, name, config, force) for name in names}
    if main:
        save_resolved(cfg, run_dir / RUN_CONFIG)
    results, statuses = {}, {}
    for name in names:
        stage_dir = run_dir / name
        if plan[name] == SKIP and read_done(stage_dir) is not None:
            if main:
                print(f"{name}: done, skipping")
            results[name], statuses[name] = read_done(stage_dir)["metrics"], "skipped (done)"
            continue
        statuses[name] = _status(stage_dir)
        distributed.barrier()  # every rank has planned before rank 0 clears the DONE marker
        if main:
            clear_done(stage_dir)
        if _runs_here(name, distributed_run):
            results[name] = STAGES[name](cfg, run_dir, force=force)
        distributed.barrier()  # the stage's files are complete before anyone reads or discards them
        if main:
            _discard_later_stages(run_dir, name)
    if not main:
        return results
    sample = _export_sample(cfg, run_dir)
    report = write_report(run_dir, statuses, results, sample)
    _print_summary(run_dir, results, sample, report)
    return results
