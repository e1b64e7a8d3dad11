"""Stage 2, LoRA recovery: next-token training of the whole converted model through LoRA adapters.

teacher → linearize → student parameters from attention transfer (absent: the no-transfer baseline)
→ peft LoRA (rank, alpha, dropout, targets) → loss = ce_weight · cross-entropy + kl_weight · KL to the teacher
(full or top-k, with a temperature) + hidden_weight · per-layer MSE to the teacher's layer outputs (the teacher
computed by the same model with the adapter disabled and teacher attention, no second copy) →
`<run>/lora_recovery/adapter/` and `student.safetensors`."""
from __future__ import annotations

from pathlib import Path

import torch

import linearize
from linearize import adapters
from linearize.files import faults_named
from linearize.losses import recovery_objective
from linearize.train.student import save_student

from .common import finish_stage, skip_stage, start_stage, train_stage
from .rundir import StageDir

STAGE = "lora_recovery"


def wrap_with_lora(model: torch.nn.Module, stage_cfg):
    """A PeftModel with LoRA on `stage_cfg.targets`; only the adapters (and, with train_student, the
    student parameters) train; no targets: the model itself, with only its student parameters trainable.
    Converted layers recompute their mechanism in backward unless `recompute_attention` is off."""
    linearize.set_recompute(model, stage_cfg.recompute_attention)
    return adapters.wrap(model, rank=stage_cfg.rank, alpha=stage_cfg.alpha, dropout=stage_cfg.dropout,
                         targets=stage_cfg.targets, train_student=stage_cfg.train_student)


def run(cfg, run_dir: Path, accept_changes: bool = False) -> dict:
    """Trains LoRA adapters on the converted model; returns the final metrics."""
    start = start_stage(cfg, run_dir, STAGE, sources=("attention_transfer",))
    peft_model = wrap_with_lora(start.model, cfg.lora_recovery)
    stage_cfg = cfg.lora_recovery
    if not any(param.requires_grad for param in peft_model.parameters()):  # no targets, and no student parameters
        return skip_stage(start, f"no LoRA targets, and {cfg.attention.mechanism} adds no trainable parameters")
    loss_fn = recovery_objective(stage_cfg.kl_weight, stage_cfg.ce_weight, kl_top_k=stage_cfg.kl_top_k,
                                 kl_temperature=stage_cfg.kl_temperature, hidden_weight=stage_cfg.hidden_weight)
    metrics = train_stage(start, peft_model, loss_fn, cfg.lora_recovery, accept_changes)
    outputs = StageDir(start.stage_dir)
    if adapters.is_wrapped(peft_model):  # no targets: no adapter, only the student parameters trained
        with faults_named(outputs.adapter):  # peft writes the folder; a full disk is one line naming it
            peft_model.save_pretrained(outputs.adapter)
    save_student(adapters.unwrap(peft_model), outputs.student)
    student_from = str(start.student_from) if start.student_from else "none (no transfer)"
    return finish_stage(start, {**metrics, "student_from": student_from})
