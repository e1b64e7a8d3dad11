"""Self-describing, atomic, verifiable training checkpoints that hold no pickles.

`<stage_dir>/step_<N>/` holds:
  trainable.safetensors  the parameters with requires_grad (names as in model.named_parameters())
  optimizer.safetensors  optimizer state + grad-scaler state (fp16), as a state tree (`state_tree.py`)
  rng.safetensors        python, numpy, torch and (if any) cuda RNG states, stored the same way
  scheduler.json         learning-rate schedule state
  state.json             step, data cursor, tokens seen
  data.json              fingerprints (sha256, shape, dtype) of the tokenized train and eval streams
  config.json            the full resolved run config
  manifest.json          sha256 of every file above (`manifest.py`)
A checkpoint is written into a temp dir, fsynced, then renamed, so a crash or a full disk leaves either
the whole checkpoint or none. Loading verifies the manifest and refuses a corrupt or malformed
checkpoint by name. Nothing here is unpickled: the manifest sits beside the files, so it catches
corruption but not tampering, and a tampered file must not be able to run code."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from ..files import as_write_fault, save_safetensors, write_json
from .manifest import (ADVICE, DEEPSPEED_ENGINE, MANIFEST, PICKLE_SUFFIXES, fsync_path, malformed,  # noqa: F401  (re-exported)
                       require_files, verify_checkpoint, write_manifest)
from .state import RESTART_HINT
from .state_tree import READ_ERRORS, STRUCTURE_KEY, read_tree, rng_state, set_rng_state, write_tree  # noqa: F401

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-step_"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
SCHEDULER_FILE = "scheduler.json"
STATE_FILE = "state.json"
DATA_FILE = "data.json"
CONFIG_FILE = "config.json"
SINGLE_ENGINE_FILES = (TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE, SCHEDULER_FILE, STATE_FILE, DATA_FILE, CONFIG_FILE)


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


def checkpoint_step(checkpoint: Path) -> int:
    """The step a `step_<N>` checkpoint folder was written at."""
    return int(CHECKPOINT_PATTERN.match(Path(checkpoint).name).group(1))


def write_fault(target: Path, err: BaseException, stage_dir: Path) -> UserError:
    """The one-line error for a write fault (disk full, quota, read-only, permissions, size limit) while
    writing `target`: names the path, the cause and the newest checkpoint, which is complete on disk."""
    try:
        last = latest_checkpoint(stage_dir)
    except OSError:
        last = None
    kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written yet"
    fault = as_write_fault(target, err)
    return UserError(f"{fault if fault is not None else f'cannot write {target}: {err}'}; {kept}")


def _read_tree(checkpoint: Path, name: str):
    try:
        return read_tree(checkpoint / name)
    except READ_ERRORS as err:
        raise malformed(checkpoint, name, err) from None


def _read_json(checkpoint: Path, name: str) -> dict:
    """A JSON object file of a checkpoint; UserError naming it when unreadable or not an object."""
    try:
        data = json.loads((checkpoint / name).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise malformed(checkpoint, name, err) from None
    if not isinstance(data, dict):
        raise malformed(checkpoint, name, "not a JSON object")
    return data


def write_rng(path: Path) -> None:
    """This process's RNG states (python, numpy, torch, cuda) as a safetensors state tree."""
    write_tree(path, rng_state())


def restore_rng(checkpoint: Path, name: str) -> None:
    try:
        set_rng_state(_read_tree(checkpoint, name))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise malformed(checkpoint, name, f"not an RNG state: {err}") from None


def tokens_fingerprint(tokens: torch.Tensor) -> dict:
    """sha256 over dtype, shape and bytes of a token tensor, with its shape and dtype for messages."""
    data = tokens.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype} {list(data.shape)}\n".encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy())  # [numel · itemsize] bytes, no copy
    return {"sha256": digest.hexdigest(), "shape": list(data.shape), "dtype": str(data.dtype).removeprefix("torch.")}


def data_fingerprint(train_tokens: torch.Tensor, eval_tokens: torch.Tensor) -> dict:
    """What a checkpoint records about its data: resuming onto another stream is refused."""
    return {"train_tokens": tokens_fingerprint(train_tokens), "eval_tokens": tokens_fingerprint(eval_tokens)}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that train, by name."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def write_run_files(tmp: Path, schedule_state: dict, state: TrainerState, config: dict, data: dict) -> None:
    """The JSON files every engine's checkpoint holds (schedule, trainer state, data fingerprint, config)."""
    write_json(tmp / SCHEDULER_FILE, schedule_state, indent=None)
    write_json(tmp / STATE_FILE, asdict(state), indent=None)
    write_json(tmp / DATA_FILE, data)
    write_json(tmp / CONFIG_FILE, config)


def install_checkpoint(tmp: Path, final: Path) -> None:
    """Renames the finished temp dir to `final`. A same-named older checkpoint is first moved aside
    under a temp name (which `remove_partial_checkpoints` cleans up), never deleted before the rename."""
    stage_dir = final.parent
    old = None
    if final.exists():
        old = stage_dir / f"{TMP_PREFIX}{final.name}-replaced-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(stage_dir)
    if old is not None:
        shutil.rmtree(old)


def _write_files(tmp: Path, model, optimizer_state: dict, schedule_state: dict, state: TrainerState,
                 config: dict, data: dict) -> None:
    save_safetensors(trainable_state(model), tmp / TRAINABLE_FILE)
    write_tree(tmp / OPTIMIZER_FILE, optimizer_state)
    write_rng(tmp / RNG_FILE)
    write_run_files(tmp, schedule_state, state, config, data)


def save_checkpoint(stage_dir: Path, model, optimizer_state: dict, schedule_state: dict,
                    state: TrainerState, config: dict, keep_last: int, *, data: dict) -> Path:
    """Writes `step_<state.step>` atomically, then deletes all but the newest `keep_last`.
    `optimizer_state`: {"optimizer": optimizer.state_dict(), "scaler": grad-scaler state or None};
    `data`: `data_fingerprint(...)` of the streams trained on. A write fault (disk full, read-only,
    ...) removes the temp dir and raises UserError naming the path and the intact last checkpoint."""
    stage_dir = Path(stage_dir)
    final = stage_dir / f"step_{state.step}"
    tmp = stage_dir / f"{TMP_PREFIX}{state.step}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write_files(tmp, model, optimizer_state, schedule_state, state, config, data)
        write_manifest(tmp, {"step": state.step})
        install_checkpoint(tmp, final)
        prune(stage_dir, keep_last)
    except Exception as err:  # safetensors' own error type included: the fault is told by its cause
        shutil.rmtree(tmp, ignore_errors=True)
        if as_write_fault(final, err) is None:
            raise
        raise write_fault(final, err, stage_dir) from None
    return final


def prune(stage_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in checkpoint_dirs(stage_dir)[:-keep_last]:
        shutil.rmtree(old)


def remove_partial_checkpoints(stage_dir: Path) -> None:
    """Deletes temp dirs left by a crash in the middle of a save (they were never renamed in)."""
    stage_dir = Path(stage_dir)
    if stage_dir.is_dir():
        for leftover in stage_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def read_checkpoint_config(path: Path) -> dict:
    return _read_json(Path(path), CONFIG_FILE)


def read_checkpoint_data(path: Path) -> dict:
    """The data fingerprint a checkpoint was trained on (see `data_fingerprint`)."""
    return _read_json(Path(path), DATA_FILE)


def read_trainer_state(path: Path) -> TrainerState:
    saved = _read_json(Path(path), STATE_FILE)
    names = [field.name for field in fields(TrainerState)]
    valid = (sorted(saved) == sorted(names)
             and all(isinstance(saved[n], int) and not isinstance(saved[n], bool) and saved[n] >= 0 for n in names))
    if not valid:
        raise malformed(Path(path), STATE_FILE, f"expected non-negative integers {', '.join(names)}")
    return TrainerState(**saved)


def load_schedule(path: Path, schedule) -> None:
    """Restores the schedule; every schedule's state is a flat dict of numbers."""
    state = _read_json(Path(path), SCHEDULER_FILE)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in state.values()):
        raise malformed(Path(path), SCHEDULER_FILE, "a schedule state holds numbers only")
    try:
        schedule.load_state_dict(state)
    except (KeyError, TypeError, ValueError) as err:
        raise malformed(Path(path), SCHEDULER_FILE, f"does not fit the {type(schedule).__name__}: {err!r}") from None


def _shape_error(path: Path, name: str, saved_shape, model_shape, what: str) -> UserError:
    return UserError(f"checkpoint {path} does not fit the model: {what} {name} has shape {list(saved_shape)} there "
                     f"and {list(model_shape)} in the model (a changed model or attention config); "
                     f"use a new run_name, or {RESTART_HINT}")


def load_trainable(model: torch.nn.Module, path: Path) -> None:
    """Copies `trainable.safetensors` into the model's trainable parameters (names and shapes must match)."""
    path = Path(path)
    try:
        with safe_open(path / TRAINABLE_FILE, "pt") as handle:
            saved = {key: handle.get_tensor(key) for key in handle.keys()}
    except (OSError, SafetensorError) as err:
        raise malformed(path, TRAINABLE_FILE, err) from None
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, param in params.items():
        if saved[name].shape != param.shape:
            raise _shape_error(path, name, saved[name].shape, param.shape, "parameter")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def _check_optimizer_state(path: Path, saved: dict, optimizer, model: torch.nn.Module) -> None:
    """The saved AdamW state must fit the optimizer's parameters, or the next step fails with a shape
    error deep inside torch: parameter counts per group and every per-parameter tensor's shape."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = optimizer.param_groups
    try:
        saved_groups, per_param = saved["param_groups"], saved["state"]
        saved_sizes = [len(group["params"]) for group in saved_groups]
        sizes = [len(group["params"]) for group in groups]
        if saved_sizes != sizes:
            raise UserError(f"checkpoint {path} does not fit the model: its optimizer state covers parameter "
                            f"groups of sizes {saved_sizes}, the model trains {sizes}; use a new run_name")
        for saved_group, group in zip(saved_groups, groups):
            for index, param in zip(saved_group["params"], group["params"]):
                for value in per_param.get(index, {}).values():
                    # 0-dim entries (AdamW's step count) are per parameter, not per element.
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                        raise _shape_error(path, names.get(id(param), f"#{index}"), value.shape, param.shape,
                                           "the optimizer state of parameter")
    except (KeyError, TypeError, AttributeError) as err:
        raise malformed(path, OPTIMIZER_FILE, f"not an optimizer state: {err!r}") from None


def load_optimizer(path: Path, optimizer, model: torch.nn.Module) -> dict:
    """Restores `optimizer` from `optimizer.safetensors`; returns the whole saved dict (with the
    grad-scaler state under "scaler")."""
    saved = _read_tree(path, OPTIMIZER_FILE)
    if not isinstance(saved, dict) or not isinstance(saved.get("optimizer"), dict):
        raise malformed(path, OPTIMIZER_FILE, "no optimizer state")
    _check_optimizer_state(path, saved["optimizer"], optimizer, model)
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (KeyError, TypeError, ValueError) as err:
        raise malformed(path, OPTIMIZER_FILE, f"does not fit the optimizer: {err}") from None
    return saved


def load_checkpoint(path: Path, model, optimizer, schedule) -> tuple[TrainerState, dict]:
    """Restores weights, optimizer, schedule and RNG from a verified checkpoint.

    Returns (trainer state, optimizer extras such as the grad-scaler state)."""
    path = Path(path)
    manifest = verify_checkpoint(path)
    if manifest.get("engine") == DEEPSPEED_ENGINE:
        raise UserError(f"checkpoint {path} was written by engine.name=deepspeed; resume it with that engine "
                        "(same number of ranks, from a run directory you trust: DeepSpeed unpickles its "
                        "files), or start the stage afresh with --force")
    require_files(path, manifest, SINGLE_ENGINE_FILES)
    load_trainable(model, path)
    extras = load_optimizer(path, optimizer, model)
    load_schedule(path, schedule)
    restore_rng(path, RNG_FILE)
    return read_trainer_state(path), extras
