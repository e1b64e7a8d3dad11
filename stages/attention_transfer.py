"""Stage 1, attention transfer: every linearized layer learns to reproduce its teacher attention.

teacher → linearize → freeze all but the student parameters → transfer mode (each layer computes
teacher and student on the same q/k/v, hands both to the collector, and passes the *teacher* output
on, so every layer trains on exact teacher inputs) → loss = mse_factor · MSE (+ attn_ce_weight ·
attention-weight cross-entropy) → `<run>/attention_transfer/student.safetensors`. A mechanism without
student parameters (liger) has nothing to learn here: the stage is recorded as skipped.

With `attention_transfer.block_size: K > 0` the same per-layer objective is trained block by block
(`stages/blockwise.py`): K decoder layers at a time, lazily loaded, on the teacher's hidden states
at the block's input (cached on disk within `cache_gb`), each block with its own optimizer, schedule and
checkpoints, spread over the launched ranks; the blocks' students are joined into the same file."""
from __future__ import annotations

from pathlib import Path

import linearize
from linearize.losses import transfer_objective
from linearize.models.teacher import load_model_tokenizer
from linearize.train import config_to_dict, distributed
from linearize.files import save_safetensors
from linearize.train.student import save_student

from . import layer_choice
from .blockwise import train_blocks
from .common import StageStart, finish_stage, skip_stage, start_stage, train_stage
from .rundir import StageDir

STAGE = "attention_transfer"


def run(cfg, run_dir: Path, accept_changes: bool = False) -> dict:
    """Trains the student parameters of every linearized layer; returns the final metrics."""
    if cfg.attention_transfer.block_size > 0:
        return run_blockwise(cfg, run_dir, accept_changes)
    start = start_stage(cfg, run_dir, STAGE, sources=())  # always a fresh student: this stage makes it
    if not linearize.freeze_for_transfer(start.model):
        return skip_stage(start, f"{cfg.attention.mechanism} adds no trainable parameters")
    stage_cfg = cfg.attention_transfer
    loss_fn = transfer_objective(stage_cfg.mse_factor, stage_cfg.attn_ce_weight)
    metrics = train_stage(start, start.model, loss_fn, stage_cfg, accept_changes)
    save_student(start.model, StageDir(start.stage_dir).student)
    return finish_stage(start, metrics)


def run_blockwise(cfg, run_dir: Path, accept_changes: bool = False) -> dict:
    """Block-wise transfer (`stages.blockwise`): never builds the whole model (`model=None` in the start)."""
    start = StageStart(layer_choice.applied(cfg, Path(run_dir)), Path(run_dir) / STAGE, None,
                       load_model_tokenizer(cfg.model), None, config_to_dict(cfg))
    main = distributed.is_main_process()
    result = train_blocks(start, accept_changes, log=print if main else lambda line: None)
    if result.skipped:
        return skip_stage(start, result.skipped)
    if main:
        save_safetensors(result.student, StageDir(start.stage_dir).student)
    distributed.barrier()  # the joined student is on disk before any rank records the stage
    return finish_stage(start, result.metrics) if main else result.metrics
