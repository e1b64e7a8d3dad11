"""Stage 2, LoRA recovery: next-token training of the whole converted model through LoRA adapters.

teacher → linearize → student parameters from attention transfer (absent: the no-transfer baseline)
→ peft LoRA (rank, alpha, dropout, targets) → loss = cross-entropy (+ kl_weight · KL to the teacher,
computed by the same model with the adapter disabled and teacher attention, no second copy) →
`<run>/lora_recovery/adapter/` and `student.safetensors`."""
from __future__ import annotations

from pathlib import Path

import torch

import linearize
from linearize.data import build_datasets, in_stage_eval
from linearize.losses import distill_kl
from linearize.surgery import wrapped_attentions
from linearize.train import config_to_dict, mark_done, seed_everything, train
from linearize.train.student import (ADAPTER_DIR, STUDENT_FILE, build_student, next_token_loss, save_student,
                                     teacher_view, unwrap)

STAGE = "lora_recovery"


def wrap_with_lora(model: torch.nn.Module, stage_cfg):
    """A PeftModel with LoRA on `stage_cfg.targets`; only the adapters (and, with train_student, the
    student parameters) train. Converted layers recompute their mechanism in backward unless
    `recompute_attention` is off."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    for layer in wrapped_attentions(model):
        layer.recompute = stage_cfg.recompute_attention
    lora = LoraConfig(r=stage_cfg.rank, lora_alpha=stage_cfg.alpha, lora_dropout=stage_cfg.dropout,
                      target_modules=list(stage_cfg.targets), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    if stage_cfg.train_student:
        for params in linearize.student_parameters(unwrap(peft_model)).values():
            for _, param in params:
                param.requires_grad_(True)
    return peft_model


def make_recovery_loss(stage_cfg):
    """loss_fn(model, input_ids [B, L]): next-token CE, plus kl_weight · KL(teacher || student)."""

    def loss_fn(model, input_ids):
        logits = model(input_ids=input_ids, use_cache=False).logits  # [B, L, V]: no decode state in training
        loss = next_token_loss(logits, input_ids)
        if stage_cfg.kl_weight > 0:
            with torch.no_grad(), teacher_view(model):
                teacher_logits = model(input_ids=input_ids, use_cache=False).logits  # [B, L, V]: no decode state in training
            loss = loss + stage_cfg.kl_weight * distill_kl(logits, teacher_logits)
        return loss

    return loss_fn


def run(cfg, run_dir: Path, accept_changes: bool = False) -> dict:
    """Trains LoRA adapters on the converted model; returns the final metrics."""
    stage_dir = Path(run_dir) / STAGE
    seed_everything(cfg.seed)
    model, tokenizer, source = build_student(cfg, run_dir, sources=("attention_transfer",))
    peft_model = wrap_with_lora(model, cfg.lora_recovery)
    train_tokens, eval_tokens = build_datasets(cfg.data, tokenizer, cfg.seed)
    eval_tokens = in_stage_eval(eval_tokens, cfg.lora_recovery)
    config = config_to_dict(cfg)
    result = train(peft_model, make_recovery_loss(cfg.lora_recovery), train_tokens, eval_tokens,
                   cfg.lora_recovery, stage_dir=stage_dir, stage=STAGE, seed=cfg.seed, engine_cfg=cfg.engine,
                   config=config, shuffle=cfg.data.shuffle, accept_changes=accept_changes)
    peft_model.save_pretrained(stage_dir / ADAPTER_DIR)
    save_student(unwrap(peft_model), stage_dir / STUDENT_FILE)
    metrics = {"step": result.step, "loss": result.loss, "eval_loss": result.eval_loss, "tokens": result.tokens,
               "plot": result.plot.name, "student_from": str(source) if source else "none (no transfer)"}
    mark_done(stage_dir, metrics, config)
    return metrics
