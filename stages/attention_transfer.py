"""Stage 1, attention transfer: every linearized layer learns to reproduce its teacher attention.

teacher → linearize → freeze all but the student parameters → transfer mode (each layer computes
teacher and student on the same q/k/v, hands both to the collector, and passes the *teacher* output
on, so every layer trains on exact teacher inputs) → loss = mse_factor · MSE (+ attn_ce_weight ·
attention-weight cross-entropy) → `<run>/attention_transfer/student.safetensors`. A mechanism without
student parameters (liger) has nothing to learn here: the stage is recorded as skipped."""
from __future__ import annotations

from pathlib import Path

import linearize
from linearize.losses import transfer_objective
from linearize.train.student import save_student

from .common import finish_stage, skip_stage, start_stage, train_stage
from .rundir import STUDENT_FILE

STAGE = "attention_transfer"


def run(cfg, run_dir: Path, accept_changes: bool = False) -> dict:
    """Trains the student parameters of every linearized layer; returns the final metrics."""
    start = start_stage(cfg, run_dir, STAGE, sources=())  # always a fresh student: this stage makes it
    if not linearize.freeze_for_transfer(start.model):
        return skip_stage(start, f"{cfg.attention.mechanism} adds no trainable parameters")
    stage_cfg = cfg.attention_transfer
    loss_fn = transfer_objective(stage_cfg.mse_factor, stage_cfg.attn_ce_weight)
    metrics = train_stage(start, start.model, loss_fn, stage_cfg, accept_changes)
    save_student(start.model, start.stage_dir / STUDENT_FILE)
    return finish_stage(start, metrics)
