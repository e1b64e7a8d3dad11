"""Self-describing, atomic, verifiable training checkpoints that hold no pickles.

`<stage_dir>/step_<N>/` holds:
  trainable.safetensors  the parameters with requires_grad (names as in model.named_parameters())
  optimizer.safetensors  optimizer state + grad-scaler state (fp16): tensors, structure as JSON metadata
  rng.safetensors        python, numpy, torch and (if any) cuda RNG states, stored the same way
  scheduler.json         learning-rate schedule state
  state.json             step, data cursor, tokens seen
  data.json              fingerprints (sha256, shape, dtype) of the tokenized train and eval streams
  config.json            the full resolved run config
  manifest.json          sha256 of every file above
A checkpoint is written into a temp dir, fsynced, then renamed, so a crash or a full disk leaves either
the whole checkpoint or none. Loading verifies the manifest and refuses a corrupt or malformed
checkpoint by name. Nothing here is unpickled: the manifest sits beside the files, so it catches
corruption but not tampering, and a tampered file must not be able to run code."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..files import sha256_file
from ..errors import UserError
from .state import RESTART_HINT

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-step_"
MANIFEST = "manifest.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
SCHEDULER_FILE = "scheduler.json"
STATE_FILE = "state.json"
DATA_FILE = "data.json"
CONFIG_FILE = "config.json"
SINGLE_ENGINE_FILES = (TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE, SCHEDULER_FILE, STATE_FILE, DATA_FILE, CONFIG_FILE)
# Files older linearize versions wrote with torch.save: refused by name, never opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin")
# The safetensors metadata key under which a state tree's structure (JSON) is stored.
STRUCTURE_KEY = "linearize.structure"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# The manifest's "engine" key of checkpoints written through DeepSpeed (linearize.train.distributed).
DEEPSPEED_ENGINE = "deepspeed"
ADVICE = "delete it to resume from an earlier checkpoint, or delete the stage dir to start over"


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


def write_fault(target: Path, err: OSError, stage_dir: Path) -> UserError:
    """The one-line error for an OSError (disk full, quota, read-only, permissions) while writing
    `target`: names the path, the OS error and the newest checkpoint, which is complete on disk."""
    try:
        last = latest_checkpoint(stage_dir)
    except OSError:
        last = None
    kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written yet"
    return UserError(f"cannot write {target}: {err}; {kept}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# State trees (optimizer, grad scaler, RNG) as safetensors: every tensor is stored by a generated name,
# everything else as JSON in the file's metadata. JSON objects are always tags, so lists, tuples and
# dicts with int keys (optimizer state is keyed by parameter index) come back as they went in.

def _encode(value, tensors: dict):
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        if not all(isinstance(key, (str, int)) for key in value):
            raise TypeError(f"a checkpointed dict has keys that are not str or int: {list(value)[:3]}")
        return {"dict": [[key, _encode(item, tensors)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(item, tensors) for item in value]}
    if isinstance(value, list):
        return [_encode(item, tensors) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def _decode(node, tensors: dict):
    """Inverse of `_encode`; ValueError on anything `_encode` does not write."""
    if isinstance(node, list):
        return [_decode(item, tensors) for item in node]
    if not isinstance(node, dict):
        return node
    if node.keys() == {"tensor"} and node["tensor"] in tensors:
        return tensors[node["tensor"]]
    if node.keys() == {"tuple"} and isinstance(node["tuple"], list):
        return tuple(_decode(item, tensors) for item in node["tuple"])
    if node.keys() == {"dict"} and isinstance(node["dict"], list):
        pairs = node["dict"]
        if all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int)) for p in pairs):
            return {key: _decode(item, tensors) for key, item in pairs}
    raise ValueError(f"unexpected entry {json.dumps(node)[:80]}")


def _write_tree(path: Path, tree) -> None:
    tensors = {}
    structure = _encode(tree, tensors)
    save_file(tensors, path, metadata={STRUCTURE_KEY: json.dumps(structure)})


def _read_tree(checkpoint: Path, name: str):
    try:
        with safe_open(checkpoint / name, "pt") as handle:
            structure = json.loads((handle.metadata() or {})[STRUCTURE_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return _decode(structure, tensors)
    except (OSError, SafetensorError, KeyError, TypeError, ValueError, RecursionError) as err:
        raise _malformed(checkpoint, name, err) from None


def _malformed(checkpoint: Path, name: str, why) -> UserError:
    return UserError(f"checkpoint {checkpoint} is malformed: {name} ({why}); {ADVICE}")


def _read_json(checkpoint: Path, name: str) -> dict:
    """A JSON object file of a checkpoint; UserError naming it when unreadable or not an object."""
    try:
        data = json.loads((checkpoint / name).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _malformed(checkpoint, name, err) from None
    if not isinstance(data, dict):
        raise _malformed(checkpoint, name, "not a JSON object")
    return data


def _write_json(path: Path, data, indent=None) -> None:
    path.write_text(json.dumps(data, indent=indent))


def _rng_state() -> dict:
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    # numpy's MT19937 key is uint32 [624]; int64 holds it exactly in a format safetensors reads anywhere.
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                   float(cached_gaussian))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state, checkpoint: Path, name: str) -> None:
    try:
        kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
        random.setstate(state["python"])
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise _malformed(checkpoint, name, f"not an RNG state: {err}") from None


def write_rng(path: Path) -> None:
    """This process's RNG states (python, numpy, torch, cuda) as a safetensors state tree."""
    _write_tree(path, _rng_state())


def restore_rng(checkpoint: Path, name: str) -> None:
    _restore_rng(_read_tree(checkpoint, name), checkpoint, name)


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
    _write_json(tmp / SCHEDULER_FILE, schedule_state)
    _write_json(tmp / STATE_FILE, asdict(state))
    _write_json(tmp / DATA_FILE, data, indent=2)
    _write_json(tmp / CONFIG_FILE, config, indent=2)


def write_manifest(tmp: Path, header: dict) -> None:
    """`manifest.json` = header + the sha256 of every file under `tmp`; then fsyncs files and folders."""
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    manifest = {**header, "files": {name: sha256_file(tmp / name) for name in files}}
    _write_json(tmp / MANIFEST, manifest, indent=2)
    for name in files + [MANIFEST]:
        _fsync_path(tmp / name)
    for folder in sorted({(tmp / name).parent for name in files} | {tmp}, reverse=True):
        _fsync_path(folder)


def install_checkpoint(tmp: Path, final: Path) -> None:
    """Renames the finished temp dir to `final`. A same-named older checkpoint is first moved aside
    under a temp name (which `remove_partial_checkpoints` cleans up), never deleted before the rename."""
    stage_dir = final.parent
    old = None
    if final.exists():
        old = stage_dir / f"{TMP_PREFIX}{final.name}-replaced-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_path(stage_dir)
    if old is not None:
        shutil.rmtree(old)


def _write_files(tmp: Path, model, optimizer_state: dict, schedule_state: dict, state: TrainerState,
                 config: dict, data: dict) -> None:
    save_file(trainable_state(model), tmp / TRAINABLE_FILE)
    _write_tree(tmp / OPTIMIZER_FILE, optimizer_state)
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
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
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


def _check_file_name(path: Path, name: str, nested: bool) -> None:
    """A manifest entry must name a file inside the checkpoint: never hash or open anything outside it.
    Only DeepSpeed checkpoints have subfolders (its `engine/` files)."""
    parts = name.split("/")
    escapes = (not name or "\\" in name or "\x00" in name or name.startswith("/") or name == MANIFEST
               or any(part in ("", ".", "..") for part in parts) or (len(parts) > 1 and not nested))
    if escapes:
        raise _malformed(path, MANIFEST, f"it lists {name!r}, which is not a file name inside the checkpoint")


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"checkpoint {path} is corrupt: unreadable {MANIFEST} ({err}); {ADVICE}") from None
    if not isinstance(manifest, dict):
        raise _malformed(path, MANIFEST, "not a JSON object")
    if not isinstance(manifest.get("files"), dict):
        raise _malformed(path, MANIFEST, 'no "files" mapping of file name to sha256')
    nested = manifest.get("engine") == DEEPSPEED_ENGINE
    for name, digest in manifest["files"].items():
        _check_file_name(path, name, nested)
        if not isinstance(digest, str) or not SHA256_HEX.match(digest):
            raise _malformed(path, MANIFEST, f"the hash of {name!r} is not a sha256 hex string")
    return manifest


def _refuse_pickles(path: Path, manifest: dict) -> None:
    """Our own files are never pickles; older versions wrote optimizer.pt / rng.pt (rng_rank<r>.pt under
    DeepSpeed). They are refused without being opened: a crafted one runs code when unpickled."""
    for name in manifest["files"]:
        if "/" not in name and name.endswith(PICKLE_SUFFIXES):
            raise UserError(
                f"checkpoint {path} holds {name}, a pickle (older linearize format) that could run code "
                f"when loaded, so it is not read; use {RESTART_HINT} (or delete {path.parent})")


def verify_checkpoint(path: Path) -> dict:
    """Checks the manifest (well-formed, names inside the checkpoint, no pickled files of ours) and
    every file's sha256; returns the manifest. Raises UserError naming the checkpoint and the problem
    (malformed manifest, truncated, missing or altered file)."""
    path = Path(path)
    manifest = _read_manifest(path)
    _refuse_pickles(path, manifest)
    try:
        _check_files(path, manifest["files"])
    except OSError as err:
        raise UserError(f"checkpoint {path} is unreadable: {err}; {ADVICE}") from None
    return manifest


def _check_files(path: Path, files: dict) -> None:
    root = path.resolve()
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise UserError(f"checkpoint {path} is corrupt: {', '.join(missing)} is missing; {ADVICE}")
    for name, expected in files.items():
        if not (path / name).resolve().is_relative_to(root):
            raise _malformed(path, MANIFEST, f"{name} links outside the checkpoint")
        if sha256_file(path / name) != expected:
            raise UserError(f"checkpoint {path} is corrupt: {name} does not match its sha256; {ADVICE}")


def require_files(path: Path, manifest: dict, names) -> None:
    """The files a loader reads must be hash-verified: refuses a manifest that does not list them."""
    unlisted = [name for name in names if name not in manifest["files"]]
    if unlisted:
        raise UserError(f"checkpoint {path} is incomplete: {MANIFEST} does not list {', '.join(unlisted)}; {ADVICE}")


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
        raise _malformed(Path(path), STATE_FILE, f"expected non-negative integers {', '.join(names)}")
    return TrainerState(**saved)


def load_schedule(path: Path, schedule) -> None:
    """Restores the schedule; every schedule's state is a flat dict of numbers."""
    state = _read_json(Path(path), SCHEDULER_FILE)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in state.values()):
        raise _malformed(Path(path), SCHEDULER_FILE, "a schedule state holds numbers only")
    try:
        schedule.load_state_dict(state)
    except (KeyError, TypeError, ValueError) as err:
        raise _malformed(Path(path), SCHEDULER_FILE, f"does not fit the {type(schedule).__name__}: {err!r}") from None


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
        raise _malformed(path, TRAINABLE_FILE, err) from None
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
        raise _malformed(path, OPTIMIZER_FILE, f"not an optimizer state: {err!r}") from None


def load_optimizer(path: Path, optimizer, model: torch.nn.Module) -> dict:
    """Restores `optimizer` from `optimizer.safetensors`; returns the whole saved dict (with the
    grad-scaler state under "scaler")."""
    saved = _read_tree(path, OPTIMIZER_FILE)
    if not isinstance(saved, dict) or not isinstance(saved.get("optimizer"), dict):
        raise _malformed(path, OPTIMIZER_FILE, "no optimizer state")
    _check_optimizer_state(path, saved["optimizer"], optimizer, model)
    try:
        optimizer.load_state_dict(saved["optimizer"])
    except (KeyError, TypeError, ValueError) as err:
        raise _malformed(path, OPTIMIZER_FILE, f"does not fit the optimizer: {err}") from None
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
