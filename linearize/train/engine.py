"""The engine seam: builds what the loop drives (model on its device, optimizer, backward/step) from
`cfg.engine`. Only `single` (one process, one device) exists; `deepspeed` will live here, the only
module allowed to import it."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

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

    def load_extras(self, state: dict) -> None:
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _build_single(engine_cfg, model: torch.nn.Module, stage_cfg) -> Engine:
    device = default_device()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: the model has no parameter with requires_grad")
    optimizer = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
    # fp16 autocast needs loss scaling; bf16 has fp32's exponent range and does not.
    scaler = torch.amp.GradScaler(device.type) if stage_cfg.autocast == "float16" else None
    return Engine(model=model, optimizer=optimizer, device=device, params=params, scaler=scaler)


def _build_deepspeed(engine_cfg, model, stage_cfg) -> Engine:
    raise UserError("engine.name=deepspeed is not yet supported; use engine.name=single")


ENGINES = {"single": _build_single, "deepspeed": _build_deepspeed}


def build_engine(engine_cfg, model: torch.nn.Module, stage_cfg) -> Engine:
    """The engine named by `engine_cfg.name`; unknown names raise ValueError listing valid ones."""
    if engine_cfg.name not in ENGINES:
        raise ValueError(f"unknown engine {engine_cfg.name!r}; valid: {', '.join(sorted(ENGINES))}")
    return ENGINES[engine_cfg.name](engine_cfg, model, stage_cfg)
