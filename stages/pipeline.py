"""The run orchestration: `<output_dir>/<run_name>/` with the resolved config, the stages in order
(finished ones skipped, interrupted ones resumed from their last checkpoint), `report.md`, and a
closing summary (teacher and student perplexity, a generation from the export)."""
from __future__ import annotations

import contextlib
from pathlib import Path

from linearize.config import config_to_dict
from linearize.errors import UserError
from linearize.train import check_same_config, distributed, latest_checkpoint, verify_checkpoint
from linearize.train.checkpoint import checkpoint_step, read_checkpoint_config
from linearize.train.distributed import DistributedSettings
from linearize.train.layer_choice import AUTO
from linearize.train.state import RESTART_HINT
from stages import behaviour, export, layer_choice, teacher_data
from stages.blockwise import block_dirs, init_block_ranks
from stages.report import write_report
from stages.registry import STAGES, TRAINING_STAGES, stage_runner
from stages.rundir import (SKIPPED, RunDir, StageDir, check_owned, check_teacher, claim_run, clear_done, discard_stage,
                           mark_stage, read_done, remove_discard_leftovers, run_lock, same_config_as_done)

SKIP, RUN = "skip", "run"


def run_dir_of(cfg) -> Path:
    return Path(cfg.output_dir) / cfg.run_name


def _check_names(names) -> None:
    unknown = [name for name in names if name not in STAGES]
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; valid: {', '.join(STAGES)}")


def _plan(stage_dir: Path, stage: str, config: dict, force: bool, accept_changes: bool) -> str:
    """SKIP a finished stage whose config is unchanged; RUN otherwise. Refuses (UserError naming the
    keys) a changed config against a finished stage or a checkpoint, unless accept_changes; then a
    finished training stage continues only if its new max_steps leaves steps to train. force: RUN."""
    check_owned(stage_dir)
    if force:
        return RUN
    done = read_done(stage_dir)
    if done is not None:
        changed = same_config_as_done(done, config, stage, StageDir(stage_dir).done, accept_changes)
        if changed and stage in TRAINING_STAGES and SKIPPED not in done["metrics"]:
            _check_steps_left(stage_dir, stage, config)  # a skipped stage trained nothing: it simply runs again
        return RUN if changed else SKIP
    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is not None:
        verify_checkpoint(checkpoint)
        check_same_config(read_checkpoint_config(checkpoint), config, stage, checkpoint, accept_changes)
    return RUN


def _trained_steps(stage_dir: Path) -> int | None:
    """Steps of a stage's last checkpoint; for a block-wise stage, of its least-trained block (each block
    continues from its own checkpoints). None without any checkpoint."""
    folders = block_dirs(stage_dir) or [stage_dir]
    checkpoints = [latest_checkpoint(folder) for folder in folders]
    if any(c is None for c in checkpoints):
        return None
    return min(checkpoint_step(c) for c in checkpoints)


def _check_steps_left(stage_dir: Path, stage: str, config: dict) -> None:
    """--accept-changes continues a finished training stage from its last checkpoint(s); with no step
    left that would re-record the stage under values it never trained with."""
    steps = _trained_steps(stage_dir)
    if steps is None or steps >= config[stage]["max_steps"]:
        steps = steps or 0
        raise UserError(f"{stage} is finished ({steps} steps, {stage}.max_steps={config[stage]['max_steps']}): "
                        f"--accept-changes has no step left to train with the new values; raise "
                        f"{stage}.max_steps to continue it, or use {RESTART_HINT}")


def _discard_later_stages(run_dir: Path, stage: str) -> None:
    """Stages after one that just ran were built on its old output: delete them so they run afresh
    (in this invocation, or the next one that asks for them)."""
    order = list(STAGES)
    for later in order[order.index(stage) + 1:]:
        if (run_dir / later).exists():
            print(f"{later}: {stage} re-ran, so its previous results are stale; discarding them")
            discard_stage(run_dir / later)


def _reruns_everything(run_dir: Path, names: list[str]) -> bool:
    """--force on every stage the run holds: nothing built on the previous teacher survives."""
    return all(stage in names for stage in STAGES if (Path(run_dir) / stage).exists())


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


def _layers_line(cfg, run_dir: Path) -> str:
    """Which layers the student keeps as softmax attention, and who chose them."""
    kept, how = cfg.attention.softmax_layers, "listed in the config"
    if kept == AUTO:
        path = layer_choice.find_layer_choice(run_dir)
        if path is None:  # no stage that chooses has run yet
            return f"student: {cfg.attention.mechanism}; softmax layers: auto, not chosen yet"
        record = layer_choice.read_layer_choice(path)
        kept, how = record["choice"], f"chosen by {record['selector']} ({path})"
    if not kept:
        return f"student: {cfg.attention.mechanism} in every converted layer, no softmax layers"
    return f"student: {cfg.attention.mechanism}, softmax attention kept in layers {list(kept)}, {how}"


def _print_summary(cfg, run_dir: Path, results: dict, sample, report: Path) -> None:
    evaluation = results.get("evaluate") or {}
    print(_layers_line(cfg, run_dir))
    if evaluation:
        teacher, student = evaluation["teacher_ppl"], evaluation["student_ppl"]
        print(f"teacher perplexity {teacher:.3f}, student perplexity {student:.3f} ({student / teacher:.2f}x the teacher)")
        for line in behaviour.summary_lines(evaluation):
            print(line)
    if sample is not None:
        print(f"export {export.export_dir(run_dir)} generates: {sample!r}")
    print(f"report: {report}")


def _block_ranks(cfg, names) -> bool:
    """Block-wise transfer launched on several ranks with the single engine (e.g. `torchrun
    --nproc_per_node N -m linearize run ...`): the ranks share the blocks of stage 1 (`blockwise`)."""
    return (cfg.engine.name != "deepspeed" and "attention_transfer" in names
            and cfg.attention_transfer.block_size > 0 and DistributedSettings.from_env().world_size > 1)


def _runs_here(name: str, cfg, distributed_run: bool) -> bool:
    """Under deepspeed every rank runs the training stages together; with the single engine, launched
    ranks share the blocks of a block-wise stage 1. The other stages run on rank 0 while the rest wait,
    since they neither train together nor need more than one process."""
    together = TRAINING_STAGES if cfg.engine.name == "deepspeed" else ("attention_transfer",)
    return not distributed_run or name in together or distributed.is_main_process()


def run_stages(cfg, stage_names=None, force: bool = False, accept_changes: bool = False) -> dict:
    """Runs `stage_names` (default cfg.stages) in order for `cfg`; returns stage → final metrics.

    force: every stage in `stage_names` is discarded and run from scratch. accept_changes: a stage whose
    config (or training data) changed continues from its last checkpoint instead of being refused.
    One process per run directory (a lock; under deepspeed, rank 0 holds it for the launch). Under
    engine.name=deepspeed every launched rank calls this: training stages run on all ranks, the rest
    (and every shared file: config, report, summary) on rank 0 only."""
    names = list(stage_names or cfg.stages)
    _check_names(names)
    if cfg.engine.name == "deepspeed":
        distributed.init()
    elif _block_ranks(cfg, names):
        init_block_ranks()
    run_dir = run_dir_of(cfg)
    if distributed.is_main_process():
        claim_run(run_dir)  # before the lock creates anything: a folder that is not a run is refused untouched
    lock = run_lock(run_dir) if distributed.is_main_process() else contextlib.nullcontext()
    with lock:
        return _run_locked(cfg, run_dir, names, force, accept_changes)


def _run_locked(cfg, run_dir: Path, names: list[str], force: bool, accept_changes: bool) -> dict:
    from stages.config_loader import save_resolved

    distributed_run = cfg.engine.name == "deepspeed" or _block_ranks(cfg, names)
    main = distributed.is_main_process()
    if main:
        remove_discard_leftovers(run_dir)
        # A teacher replaced at the same path would train the rest of the run on other weights.
        check_teacher(RunDir(run_dir), cfg.model, record_new=force and _reruns_everything(run_dir, names))
    config = config_to_dict(cfg)
    plan = {name: _plan(run_dir / name, name, config, force, accept_changes) for name in names}
    if main:
        save_resolved(cfg, RunDir(run_dir).config)
    results, statuses = {}, {}
    for name in names:
        stage_dir = run_dir / name
        if plan[name] == SKIP and read_done(stage_dir) is not None:
            if main:
                print(f"{name}: done, skipping")
            results[name], statuses[name] = read_done(stage_dir)["metrics"], "skipped (done)"
            continue
        distributed.barrier()  # every rank has planned before rank 0 clears the DONE marker
        if main:
            if force and discard_stage(stage_dir):
                print(f"{name}: --force, discarded its previous outputs")
            clear_done(stage_dir)
            mark_stage(stage_dir, name)
            teacher_data.ensure_teacher_samples(cfg, run_dir)  # once per run: the data the stages read
            layer_choice.ensure_choice(cfg, run_dir, name)  # once per run, before the first stage that builds
        distributed.barrier()  # rank 0 has discarded (and chosen) before any rank looks for a checkpoint
        statuses[name] = _status(stage_dir)
        if _runs_here(name, cfg, distributed_run):
            results[name] = stage_runner(name)(cfg, run_dir, accept_changes=accept_changes)
        distributed.barrier()  # the stage's files are complete before anyone reads or discards them
        if main:
            mark_stage(stage_dir, name)  # again: the export stage replaces its whole folder
            _discard_later_stages(run_dir, name)
    if not main:
        return results
    sample = _export_sample(cfg, run_dir)
    report = write_report(run_dir, statuses, results, sample)
    _print_summary(cfg, run_dir, results, sample, report)
    return results
