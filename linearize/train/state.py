"""Run-state helpers shared by the loop and the stages: config snapshots and their comparison (a
checkpoint refuses to resume under a changed config), seeding. Files are written by `linearize.files`. The DONE records
and the rest of the run-directory layout belong to the runners (`stages/rundir.py`)."""
from __future__ import annotations

from pathlib import Path

from ..config import RunConfig, changed_keys, config_to_dict, stage_sections  # noqa: F401  (linearize.train re-exports changed_keys, config_to_dict)
from ..errors import UserError
from ..files import write_json

# Keys (dotted below the top level) that name, order or speed up a run but change nothing a stage computes:
# the teacher cache only saves measuring the same teacher again.
NON_COMPUTING_KEYS = ("run_name", "output_dir", "stages", "evaluate.behaviour.teacher_cache")


def _without(tree, path: list[str]):
    """`tree` (nested dicts) without the key at `path`; the input is not changed."""
    head, *rest = path
    if not isinstance(tree, dict) or head not in tree:
        return tree
    if not rest:
        return {key: value for key, value in tree.items() if key != head}
    return {**tree, head: _without(tree[head], rest)}


def stage_view(config: dict, stage: str) -> dict:
    """The part of a full config dict that stage `stage` depends on: everything except NON_COMPUTING_KEYS
    and the sections of the other stages."""
    skip = set(stage_sections()) - {stage}
    view = {key: value for key, value in config.items() if key not in skip}
    for dotted in NON_COMPUTING_KEYS:
        view = _without(view, dotted.split("."))
    return view


# The two ways past a refused resume, named once for every message that offers them.
RESTART_HINT = "--force to re-run it from scratch"
ACCEPT_HINT = "--accept-changes to continue from its last checkpoint with the new values"


def check_same_config(saved: dict, current: dict, stage: str, where: Path, accept: bool) -> list[str]:
    """Refuses (UserError naming the keys) to continue `stage` from `where` under a changed config,
    unless `accept`. Returns the changed keys."""
    defaults = stage_view(config_to_dict(RunConfig()), stage)  # keys added since `saved` was written
    keys = changed_keys(stage_view(saved, stage), stage_view(current, stage), defaults)
    if keys and not accept:
        raise UserError(
            f"{stage}: the config changed since {where} was written ({', '.join(keys)}); "
            f"use a new run_name, {RESTART_HINT}, or {ACCEPT_HINT}"
        )
    return keys


def write_json_atomic(path: Path, data) -> None:
    """`linearize.files.write_json` under its older name, for callers not yet converted."""
    write_json(path, data)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices), so parameter inits (feature maps, LoRA) and dropout
    are the same in every process that runs a stage with this seed."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

