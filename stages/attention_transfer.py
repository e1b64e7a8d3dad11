"""Stage 1, attention transfer: every linearized layer learns to reproduce its teacher attention.

teacher → linearize → freeze all but the student parameters → transfer mode (each layer computes
teacher and student on the same q/k/v, hands both to the collector, and passes the *teacher* output
on, so every layer trains on exact teacher inputs) → loss = mse_factor · MSE (+ attn_ce_weight ·
attention-weight cross-entropy) → `<run>/attention_transfer/student.safetensors`."""
from __future__ import annotations

from pathlib import Path

import linearize
from linearize.data import build_datasets, in_stage_eval
from linearize.losses import PairCollector, attention_ce, transfer_mse
from linearize.train import config_to_dict, mark_done, seed_everything, train
from linearize.train.student import STUDENT_FILE, load_converted, save_student

STAGE = "attention_transfer"


def make_transfer_loss(collector: PairCollector, stage_cfg):
    """loss_fn(model, input_ids [B, L]) for the loop: one teacher-forced forward through the decoder
    (the LM head is skipped: transfer needs only the per-layer pairs)."""

    def loss_fn(model, input_ids):
        collector.take()
        with linearize.transfer_mode(model, collector):
            model.get_decoder()(input_ids=input_ids, use_cache=False)  # no decode state in training
        pairs = collector.take()
        loss = transfer_mse(pairs, stage_cfg.mse_factor)
        if stage_cfg.attn_ce_weight > 0:
            loss = loss + stage_cfg.attn_ce_weight * attention_ce(pairs)
        return loss

    return loss_fn


def run(cfg, run_dir: Path, accept_changes: bool = False) -> dict:
    """Trains the student parameters of every linearized layer; returns the final metrics."""
    stage_dir = Path(run_dir) / STAGE
    seed_everything(cfg.seed)
    model, tokenizer = load_converted(cfg)
    linearize.freeze_for_transfer(model)
    train_tokens, eval_tokens = build_datasets(cfg.data, tokenizer, cfg.seed)
    eval_tokens = in_stage_eval(eval_tokens, cfg.attention_transfer)
    collector = PairCollector(want_weights=cfg.attention_transfer.attn_ce_weight > 0)
    config = config_to_dict(cfg)
    result = train(model, make_transfer_loss(collector, cfg.attention_transfer), train_tokens, eval_tokens,
                   cfg.attention_transfer, stage_dir=stage_dir, stage=STAGE, seed=cfg.seed,
                   engine_cfg=cfg.engine, config=config, shuffle=cfg.data.shuffle, accept_changes=accept_changes)
    save_student(model, stage_dir / STUDENT_FILE)
    metrics = {"step": result.step, "loss": result.loss, "eval_loss": result.eval_loss, "tokens": result.tokens,
               "plot": result.plot.name}
    mark_done(stage_dir, metrics, config)
    return metrics
