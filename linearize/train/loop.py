"""The training loop both training stages use.

Per optimizer step: set the scheduled lr → `grad_accum` micro-batches from the deterministic stream
(forward under autocast, stop on a non-finite loss, backward) → clip + step → log a metrics line →
eval every `eval_every` → checkpoint every `save_every` and at the end. A stage supplies the model
(trainable parameters already chosen) and `loss_fn(model, input_ids [B, L]) -> scalar loss`."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from .checkpoint import (TrainerState, checkpoint_step, data_fingerprint, latest_checkpoint, read_checkpoint_config,
                         read_checkpoint_data, remove_partial_checkpoints, verify_checkpoint, write_fault)
from .engine import Engine, autocast_context, build_engine
from .metrics import MetricsLog, plot_metrics
from .sampler import sample_indices
from .schedule import build_schedule
from .state import ACCEPT_HINT, RESTART_HINT, check_same_config

LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
# A step can finish within the timer's resolution on tiny models; never divide by zero.
MIN_ELAPSED_S = 1e-9


@dataclass
class TrainResult:
    step: int
    loss: Optional[float]
    eval_loss: Optional[float]
    tokens: int
    resumed_from: Optional[int]
    checkpoint: Path
    plot: Path


@dataclass
class _Run:
    """Everything the step functions share."""

    engine: Engine
    schedule: object
    loss_fn: LossFn
    stage_cfg: object
    train_tokens: torch.Tensor
    eval_tokens: torch.Tensor
    seed: int
    shuffle: bool


def evaluate_loss(model, loss_fn: LossFn, tokens: torch.Tensor, batch_size: int, autocast: str,
                  device: torch.device) -> Optional[float]:
    """Mean loss over `tokens` `[M, L]` in batches, without gradients; None when M = 0."""
    if len(tokens) == 0:
        return None
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            with autocast_context(autocast, device):
                losses.append(float(loss_fn(model, tokens[start:start + batch_size].to(device))))
    model.train(was_training)
    return sum(losses) / len(losses)


def _stop_on_nonfinite(value: float, step: int, stage_dir: Path, what: str = "loss") -> None:
    """Raises UserError naming the step and the last good checkpoint (kept as it is) if value is nan/inf."""
    if math.isfinite(value):
        return
    last = latest_checkpoint(stage_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    raise UserError(f"{what} is {value} at step {step} in {stage_dir}: training stopped; {kept}")


def _micro_positions(cursor: int, micro: int, engine: Engine, micro_batch: int) -> int:
    """First stream position of micro-batch `micro` on this rank: ranks interleave micro-batches, so
    the global batch is the single-process batch of grad_accum × world micro-batches."""
    return cursor + (micro * engine.world_size + engine.rank) * micro_batch


def _checked_loss(engine: Engine, loss: torch.Tensor, step: int, stage_dir: Path) -> float:
    """This rank's loss value; every rank stops together if any rank's loss is not finite."""
    value = float(loss.detach())
    worst = max(engine.gather([value]), key=lambda v: not math.isfinite(v))
    _stop_on_nonfinite(worst, step, stage_dir)
    return value


def _train_step(run: _Run, state: TrainerState, stage_dir: Path) -> dict:
    cfg, engine = run.stage_cfg, run.engine
    step = state.step + 1
    lr = run.schedule.lr(step)
    engine.set_lr(lr)
    engine.model.train()
    started, losses, tokens = time.perf_counter(), [], 0
    for micro in range(cfg.grad_accum):
        first = _micro_positions(state.cursor, micro, engine, cfg.micro_batch_size)
        index = sample_indices(first, cfg.micro_batch_size, len(run.train_tokens), run.seed, run.shuffle)
        batch = run.train_tokens[index].to(engine.device)  # [B, L]
        with autocast_context(cfg.autocast, engine.device):
            loss = engine.loss(batch)
        losses.append(_checked_loss(engine, loss, step, stage_dir))
        engine.backward(loss / cfg.grad_accum)
        tokens += batch.numel() * engine.world_size
    state.cursor += cfg.micro_batch_size * cfg.grad_accum * engine.world_size
    grad_norm = engine.step(cfg.grad_clip)
    # With fp16 loss scaling, inf grads are expected: the scaler skips the step.
    if not engine.loss_scaling and grad_norm is not None:
        _stop_on_nonfinite(grad_norm, step, stage_dir, "grad norm")
    state.step, state.tokens = step, state.tokens + tokens
    elapsed = time.perf_counter() - started
    # Summed in stream order, so the logged loss matches a single process reading the same batch.
    every = engine.gather(losses)
    return {"step": step, "loss": sum(every) / len(every), "lr": lr, "grad_norm": grad_norm,
            "tokens": state.tokens, "tokens_per_s": tokens / max(elapsed, MIN_ELAPSED_S)}


def _short(fingerprint) -> str:
    """`sha256 1a2b3c4d… [N, L] int64` for messages (anything malformed is shown as it is)."""
    if not isinstance(fingerprint, dict):
        return repr(fingerprint)
    return f"sha256 {str(fingerprint.get('sha256'))[:12]}… {fingerprint.get('shape')} {fingerprint.get('dtype')}"


def check_same_data(saved: dict, current: dict, stage: str, where: Path, accept_changes: bool) -> list[str]:
    """Refuses (UserError naming the stream and both fingerprints) to continue `stage` from `where` on
    other data than it was trained on, unless accept_changes. Returns the changed stream names."""
    changed = [name for name in current if saved.get(name) != current[name]]
    if changed and not accept_changes:
        what = "; ".join(f"{name.replace('_tokens', '')} data {_short(saved.get(name))} -> {_short(current[name])}"
                         for name in changed)
        raise UserError(f"{stage}: the data changed since {where} was written ({what}); "
                        f"use a new run_name, {RESTART_HINT}, or {ACCEPT_HINT}")
    return changed


def _resume(engine: Engine, schedule, stage_dir: Path, config: dict, data: dict, stage: str,
            accept_changes: bool):
    """Restores the newest checkpoint (verified; same config and data unless accept_changes); None when
    there is none."""
    if engine.is_main:
        remove_partial_checkpoints(stage_dir)
    engine.barrier()
    path = latest_checkpoint(stage_dir)
    if path is None:
        return None, None
    verify_checkpoint(path)
    check_same_config(read_checkpoint_config(path), config, stage, path, accept_changes)
    check_same_data(read_checkpoint_data(path), data, stage, path, accept_changes)
    return engine.load(path, schedule), path


@contextlib.contextmanager
def _writing(target: Path, stage_dir: Path):
    """An OSError (disk full, quota, read-only) while writing `target` becomes a one-line UserError
    naming it and the last good checkpoint."""
    try:
        yield
    except OSError as err:
        raise write_fault(target, err, stage_dir) from None


def train(model: torch.nn.Module, loss_fn: LossFn, train_tokens: torch.Tensor, eval_tokens: torch.Tensor,
          stage_cfg, *, stage_dir: Path, stage: str, seed: int, engine_cfg, config: dict,
          shuffle: bool = True, accept_changes: bool = False) -> TrainResult:
    """Trains `model`'s trainable parameters with `loss_fn` to `stage_cfg.max_steps`, resuming from the
    newest checkpoint in `stage_dir` if there is one. `config` is the full resolved run config (dict),
    stored in every checkpoint and compared on resume, as are fingerprints of the token streams;
    `accept_changes` resumes despite a changed config or changed data. train/eval tokens: `[N, L]` /
    `[M, L]`."""
    stage_dir = Path(stage_dir)
    with _writing(stage_dir, stage_dir):
        stage_dir.mkdir(parents=True, exist_ok=True)
    engine = build_engine(engine_cfg, model, stage_cfg, loss_fn)
    schedule = build_schedule(stage_cfg)
    data = data_fingerprint(train_tokens, eval_tokens)
    state, resumed = _resume(engine, schedule, stage_dir, config, data, stage, accept_changes)
    state = state or TrainerState()
    metrics = MetricsLog(stage_dir / METRICS_FILE)
    if engine.is_main:
        with _writing(metrics.path, stage_dir):
            metrics.truncate_after(state.step)
    run = _Run(engine, schedule, loss_fn, stage_cfg, train_tokens, eval_tokens, seed, shuffle)
    checkpoint = resumed
    with tqdm(total=stage_cfg.max_steps, initial=state.step, desc=stage, dynamic_ncols=True,
              disable=not engine.is_main) as bar:
        while state.step < stage_cfg.max_steps:
            record = _train_step(run, state, stage_dir)
            if _due(state.step, stage_cfg.eval_every, stage_cfg.max_steps):
                # Every rank evaluates the whole eval set: under ZeRO-3 each forward is collective.
                eval_loss = evaluate_loss(engine.model, lambda _, batch: engine.loss(batch), eval_tokens,
                                          stage_cfg.micro_batch_size, stage_cfg.autocast, engine.device)
                record["eval_loss"] = eval_loss
                if eval_loss is not None:
                    _stop_on_nonfinite(eval_loss, state.step, stage_dir, "eval loss")
                    schedule.on_eval(eval_loss)
            if engine.is_main:
                with _writing(metrics.path, stage_dir):
                    metrics.append(record)
            if _due(state.step, stage_cfg.save_every, stage_cfg.max_steps):
                checkpoint = engine.save(stage_dir, schedule.state_dict(), state, config, stage_cfg.keep_last,
                                         data)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}")
    engine.finish()
    engine.barrier()
    records = metrics.read()
    plot = stage_dir / PLOT_FILE
    if engine.is_main:
        with _writing(plot, stage_dir):
            plot_metrics(records, plot, stage)
    final = records[-1] if records else {}
    last_eval = next((r["eval_loss"] for r in reversed(records) if r.get("eval_loss") is not None), None)
    return TrainResult(step=state.step, loss=final.get("loss"), eval_loss=last_eval, tokens=state.tokens,
                       resumed_from=checkpoint_step(resumed) if resumed else None,
                       checkpoint=checkpoint, plot=plot)


def _due(step: int, every: int, max_steps: int) -> bool:
    """True at multiples of `every` (0 disables) and always at the last step."""
    return step == max_steps or (every > 0 and step % every == 0)
