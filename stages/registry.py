"""The pipeline's stages, in order: the one list every other place (config check, CLI choices, the
pipeline) reads. Light on purpose (no torch): `linearize --help` and config checks import it."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StageSpec:
    module: str  # a module under stages/ with `run(cfg, run_dir, accept_changes=False) -> dict`
    trains: bool  # trains from checkpoints: runs on every rank, and --accept-changes continues it


STAGES: dict[str, StageSpec] = {
    "attention_transfer": StageSpec("stages.attention_transfer", trains=True),
    "lora_recovery": StageSpec("stages.lora_recovery", trains=True),
    "evaluate": StageSpec("stages.evaluate", trains=False),
    "export": StageSpec("stages.export", trains=False),
}
TRAINING_STAGES = tuple(name for name, spec in STAGES.items() if spec.trains)


def stage_runner(name: str) -> Callable[..., dict]:
    return importlib.import_module(STAGES[name].module).run
