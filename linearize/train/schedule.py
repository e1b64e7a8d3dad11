"""Learning-rate schedules: linear warmup, then cosine | plateau | constant.

Each schedule is a small object whose whole state is a JSON-able dict, so a checkpoint restores it
exactly. `lr(step)` is the rate used for optimizer step `step` (1-based); `on_eval(loss)` feeds the
held-out loss (only the plateau schedule uses it)."""
from __future__ import annotations

import math


# torch's ReduceLROnPlateau default: an eval loss must beat the best by 0.01% to count as better.
PLATEAU_REL_THRESHOLD = 1e-4


def _warmup_factor(step: int, warmup_steps: int) -> float:
    return min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0


class ConstantSchedule:
    def __init__(self, cfg):
        self.base_lr, self.warmup_steps = cfg.lr, cfg.warmup_steps

    def lr(self, step: int) -> float:
        return self.base_lr * _warmup_factor(step, self.warmup_steps)

    def on_eval(self, loss: float) -> None:
        """Constant schedules ignore the eval loss."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore: the rate is a function of the step."""


class CosineSchedule(ConstantSchedule):
    """Warmup to cfg.lr, then half a cosine down to cfg.min_lr at cfg.max_steps."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.min_lr, self.max_steps = cfg.min_lr, cfg.max_steps

    def lr(self, step: int) -> float:
        if step <= self.warmup_steps:
            return self.base_lr * _warmup_factor(step, self.warmup_steps)
        decay_steps = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


class PlateauSchedule(ConstantSchedule):
    """Warmup, then multiply the rate by plateau_factor after plateau_patience evals without a new
    best eval loss (ReduceLROnPlateau semantics, mode=min, relative threshold), floored at min_lr."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.min_lr, self.patience, self.factor = cfg.min_lr, cfg.plateau_patience, cfg.plateau_factor
        self.scale, self.best, self.bad_evals = 1.0, math.inf, 0

    def lr(self, step: int) -> float:
        return max(self.min_lr, self.base_lr * self.scale) * _warmup_factor(step, self.warmup_steps)

    def on_eval(self, loss: float) -> None:
        if loss < self.best * (1.0 - PLATEAU_REL_THRESHOLD):
            self.best, self.bad_evals = loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.patience:
            self.scale *= self.factor
            self.bad_evals = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.best, self.bad_evals = state["scale"], state["best"], state["bad_evals"]


SCHEDULES = {"constant": ConstantSchedule, "cosine": CosineSchedule, "plateau": PlateauSchedule}


def build_schedule(stage_cfg):
    """The schedule named by `stage_cfg.scheduler`; unknown names raise ValueError listing valid ones."""
    if stage_cfg.scheduler not in SCHEDULES:
        raise ValueError(f"unknown scheduler {stage_cfg.scheduler!r}; valid: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[stage_cfg.scheduler](stage_cfg)
