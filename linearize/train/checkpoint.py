"""Self-describing, atomic, verifiable training checkpoints.

`<stage_dir>/step_<N>/` holds:
  trainable.safetensors  the parameters with requires_grad (names as in model.named_parameters())
  optimizer.pt           optimizer state (+ grad-scaler state for fp16)
  scheduler.json         learning-rate schedule state
  rng.pt                 python, numpy, torch and (if any) cuda RNG states
  state.json             step, data cursor, tokens seen
  config.json            the full resolved run config
  manifest.json          sha256 of every file above
A checkpoint is written into a temp dir, fsynced, then renamed, so a crash leaves either the whole
checkpoint or none. Loading verifies the manifest and refuses a corrupt checkpoint by name."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-step_"
MANIFEST = "manifest.json"
# Fault injection for the resume tests: SIGKILL the process right after this step's checkpoint is
# on disk, the harshest interruption a job can see.
KILL_AFTER_CHECKPOINT_ENV = "LINEARIZE_FAULT_KILL_AFTER_CHECKPOINT"
HASH_BLOCK = 1 << 20
# The manifest's "engine" key of checkpoints written through DeepSpeed (linearize.train.distributed).
DEEPSPEED_ENGINE = "deepspeed"


@dataclass
class TrainerState:
    """Where training stands after `step` optimizer steps."""

    step: int = 0
    cursor: int = 0  # sequences consumed from the deterministic data stream
    tokens: int = 0


def checkpoint_dirs(stage_dir: Path) -> list[Path]:
    """Finished checkpoints of a stage, oldest first."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in stage_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(stage_dir: Path):
    dirs = checkpoint_dirs(stage_dir)
    return dirs[-1] if dirs else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that train, by name."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _write_files(tmp: Path, model, optimizer_state: dict, schedule_state: dict, state: TrainerState, config: dict) -> None:
    save_file(trainable_state(model), tmp / "trainable.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "scheduler.json").write_text(json.dumps(schedule_state))
    (tmp / "state.json").write_text(json.dumps(asdict(state)))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))


def save_checkpoint(stage_dir: Path, model, optimizer_state: dict, schedule_state: dict,
                    state: TrainerState, config: dict, keep_last: int) -> Path:
    """Writes `step_<state.step>` atomically, then deletes all but the newest `keep_last`."""
    stage_dir = Path(stage_dir)
    final = stage_dir / f"step_{state.step}"
    tmp = stage_dir / f"{TMP_PREFIX}{state.step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_files(tmp, model, optimizer_state, schedule_state, state, config)
    files = sorted(p.name for p in tmp.iterdir())
    manifest = {"step": state.step, "files": {name: _sha256(tmp / name) for name in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for name in files + [MANIFEST]:
        _fsync_path(tmp / name)
    _fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_path(stage_dir)
    _prune(stage_dir, keep_last)
    _maybe_inject_kill(state.step)
    return final


def _prune(stage_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in checkpoint_dirs(stage_dir)[:-keep_last]:
        shutil.rmtree(old)


def _maybe_inject_kill(step: int) -> None:
    target = os.environ.get(KILL_AFTER_CHECKPOINT_ENV)
    if target is not None and int(target) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def remove_partial_checkpoints(stage_dir: Path) -> None:
    """Deletes temp dirs left by a crash in the middle of a save (they were never renamed in)."""
    stage_dir = Path(stage_dir)
    if stage_dir.is_dir():
        for leftover in stage_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def verify_checkpoint(path: Path) -> dict:
    """Checks the manifest and every file's sha256; returns the manifest. Raises UserError naming the
    checkpoint and the problem (truncated, missing or altered file)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    advice = "delete it to resume from an earlier checkpoint, or delete the stage dir to start over"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {path} is corrupt: unreadable {MANIFEST} ({err}); {advice}") from err
    missing = [name for name in manifest["files"] if not (path / name).is_file()]
    if missing:
        raise UserError(f"checkpoint {path} is corrupt: {', '.join(missing)} is missing; {advice}")
    for name, expected in manifest["files"].items():
        if _sha256(path / name) != expected:
            raise UserError(f"checkpoint {path} is corrupt: {name} does not match its sha256; {advice}")
    return manifest


def read_checkpoint_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    """Copies `trainable.safetensors` into the model's trainable parameters (names must match)."""
    saved = load_file(Path(path) / "trainable.safetensors")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def load_checkpoint(path: Path, model, optimizer, schedule) -> tuple[TrainerState, dict]:
    """Restores weights, optimizer, schedule and RNG from a verified checkpoint.

    Returns (trainer state, optimizer extras such as the grad-scaler state)."""
    path = Path(path)
    if verify_checkpoint(path).get("engine") == DEEPSPEED_ENGINE:
        raise UserError(f"checkpoint {path} was written by engine.name=deepspeed; resume it with that engine "
                        "(same number of ranks), or start the stage afresh with --force")
    load_trainable(model, path)
    # Our own file, hash-verified above: the RNG states hold numpy arrays that weights_only rejects.
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(optimizer_state["optimizer"])
    schedule.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    _restore_rng(torch.load(path / "rng.pt", weights_only=False))
    state = TrainerState(**json.loads((path / "state.json").read_text()))
    return state, optimizer_state
