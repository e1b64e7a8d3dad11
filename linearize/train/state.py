"""Run-state helpers shared by the stages: config snapshots and their comparison, and the DONE marker
that lets the pipeline skip a finished stage."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from ..errors import UserError

STAGE_NAMES = ("attention_transfer", "lora_recovery", "evaluate", "export")
# Keys that name or order a run but change nothing a stage computes.
NON_COMPUTING_KEYS = ("run_name", "output_dir", "stages")
DONE_FILE = "DONE"


def config_to_dict(cfg) -> dict:
    """A plain JSON-able dict of a RunConfig (dataclass or OmegaConf structured config)."""
    if dataclasses.is_dataclass(cfg):
        data = dataclasses.asdict(cfg)
    else:
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps(data))


def stage_view(config: dict, stage: str) -> dict:
    """The part of a full config dict that stage `stage` depends on: everything except run naming and
    the sections of the other stages."""
    skip = set(NON_COMPUTING_KEYS) | (set(STAGE_NAMES) - {stage})
    return {key: value for key, value in config.items() if key not in skip}


def _flatten(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix: data}
    flat = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_keys(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two config dicts (including keys only in one)."""
    old, new = _flatten(saved), _flatten(current)
    return sorted(key for key in old.keys() | new.keys() if old.get(key, "<absent>") != new.get(key, "<absent>"))


# The two ways past a refused resume, named once for every message that offers them.
RESTART_HINT = "--force to re-run it from scratch"
ACCEPT_HINT = "--accept-changes to continue from its last checkpoint with the new values"


def check_same_config(saved: dict, current: dict, stage: str, where: Path, accept: bool) -> list[str]:
    """Refuses (UserError naming the keys) to continue `stage` from `where` under a changed config,
    unless `accept`. Returns the changed keys."""
    keys = changed_keys(stage_view(saved, stage), stage_view(current, stage))
    if keys and not accept:
        raise UserError(
            f"{stage}: the config changed since {where} was written ({', '.join(keys)}); "
            f"use a new run_name, {RESTART_HINT}, or {ACCEPT_HINT}"
        )
    return keys


def write_json_atomic(path: Path, data) -> None:
    """Writes JSON through a temp file + fsync + rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def config_digest(config: dict, stage: str) -> str:
    """sha256 of the part of `config` that `stage` depends on (key order does not matter)."""
    import hashlib

    return hashlib.sha256(json.dumps(stage_view(config, stage), sort_keys=True).encode()).hexdigest()


def mark_done(stage_dir: Path, metrics: dict, config: dict, *, stage: Optional[str] = None) -> None:
    """Writes `<stage_dir>/DONE` with the stage's final metrics and the config it ran with. With `stage`,
    the record keeps only the digest of that stage's config: for a folder meant to be shared (the
    export), whose config would name local paths of this machine."""
    record = {"metrics": metrics}
    if stage is None:
        record["config"] = config
    else:
        record["config_digest"] = config_digest(config, stage)
    write_json_atomic(Path(stage_dir) / DONE_FILE, record)


def same_config_as_done(done: dict, config: dict, stage: str, where: Path, accept: bool) -> list[str]:
    """check_same_config against a DONE record, which holds the config or (shared folders) its digest."""
    if "config" in done:
        return check_same_config(done["config"], config, stage, where, accept)
    if done["config_digest"] == config_digest(config, stage):
        return []
    if not accept:
        raise UserError(f"{stage}: the config changed since {where} was written (the record keeps only a digest, "
                        f"so the keys are not named); use a new run_name, {RESTART_HINT}, or {ACCEPT_HINT}")
    return ["<config digest>"]


def read_done(stage_dir: Path):
    """The DONE record ({"metrics", "config"}) of a finished stage, or None."""
    path = Path(stage_dir) / DONE_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupt ({err}); delete it to re-run the stage") from None
    well_formed = isinstance(record, dict) and "metrics" in record and (
        isinstance(record.get("config"), dict) or isinstance(record.get("config_digest"), str))
    if not well_formed:
        raise UserError(f"{path} is corrupt (not a DONE record with metrics and config); delete it to re-run the stage")
    return record


def clear_done(stage_dir: Path) -> None:
    (Path(stage_dir) / DONE_FILE).unlink(missing_ok=True)


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices), so parameter inits (feature maps, LoRA) and dropout
    are the same in every process that runs a stage with this seed."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
