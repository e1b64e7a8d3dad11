"""The engine seam: builds what the loop drives (model on its device, optimizer, backward/step) from
`cfg.engine`: `single` (one process, one device) or `deepspeed` (ZeRO across ranks, built in
`linearize.train.distributed`, the only module that imports deepspeed, and only when that engine is
asked for). Both expose the same seam: set_lr, loss, backward, step, gather, barrier, save, load, finish."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import UserError

AUTOCAST_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_context(name: str, device: torch.device):
    """`torch.autocast` for the stage's `autocast` field (none | bfloat16 | float16)."""
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"unknown autocast {name!r}; valid: {', '.join(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[name]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Engine:
    """A model on its device with AdamW over its trainable parameters."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    params: list
    scaler: Optional[torch.amp.GradScaler] = None
    loss_fn: Optional[Callable] = None
    rank: int = 0
    world_size: int = 1
    is_main: bool = True

    @property
    def loss_scaling(self) -> bool:
        """fp16 loss scaling: inf grads then skip a step instead of stopping the run."""
        return self.scaler is not None

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The stage's loss on a batch `[B, L]` (already on `device`)."""
        return self.loss_fn(self.model, input_ids)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, grad_clip: float) -> float:
        """Clips (grad_clip ≤ 0 disables), steps, zeroes the grads; returns the pre-clip grad norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = grad_clip if grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_extras(self, state: dict, path: Path) -> None:
        """Restores the fp16 grad-scaler state saved beside the optimizer's (`path`: for messages)."""
        if not (self.scaler and state.get("scaler")):
            return
        try:
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, AttributeError, RuntimeError) as err:
            raise UserError(f"checkpoint {path} is malformed: its grad-scaler state does not load ({err!r})") from None

    def gather(self, values: list[float]) -> list[float]:
        """Per-micro-batch values of all ranks in stream order: one process holds them all."""
        return list(values)

    def barrier(self) -> None:
        """Nothing to wait for in one process."""

    def save(self, stage_dir: Path, schedule_state: dict, state, config: dict, keep_last: int, data: dict) -> Path:
        from .checkpoint import save_checkpoint

        return save_checkpoint(stage_dir, self.model, self.state_dict(), schedule_state, state, config, keep_last,
                               data=data)

    def load(self, path: Path, schedule):
        from .checkpoint import load_checkpoint

        state, extras = load_checkpoint(path, self.model, self.optimizer, schedule)
        self.load_extras(extras, path)
        return state

    def finish(self) -> None:
        """The model already holds its trained weights."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _build_single(engine_cfg, model: torch.nn.Module, stage_cfg, loss_fn: Optional[Callable]) -> Engine:
    device = default_device()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: the model has no parameter with requires_grad")
    optimizer = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
    # fp16 autocast needs loss scaling; bf16 has fp32's exponent range and does not.
    scaler = torch.amp.GradScaler(device.type) if stage_cfg.autocast == "float16" else None
    return Engine(model=model, optimizer=optimizer, device=device, params=params, scaler=scaler, loss_fn=loss_fn)


def _build_deepspeed(engine_cfg, model: torch.nn.Module, stage_cfg, loss_fn: Optional[Callable]):
    if loss_fn is None:
        raise ValueError("engine.name=deepspeed needs the stage's loss_fn: the loss runs inside the engine")
    from .distributed import build_deepspeed_engine

    return build_deepspeed_engine(engine_cfg, model, stage_cfg, loss_fn)


ENGINES = {"single": _build_single, "deepspeed": _build_deepspeed}


def build_engine(engine_cfg, model: torch.nn.Module, stage_cfg, loss_fn: Optional[Callable] = None) -> Engine:
    """The engine named by `engine_cfg.name`; unknown names raise ValueError listing valid ones.
    `loss_fn(model, input_ids [B, L]) -> scalar` is what `engine.loss` computes."""
    if engine_cfg.name not in ENGINES:
        raise ValueError(f"unknown engine {engine_cfg.name!r}; valid: {', '.join(sorted(ENGINES))}")
    return ENGINES[engine_cfg.name](engine_cfg, model, stage_cfg, loss_fn)
