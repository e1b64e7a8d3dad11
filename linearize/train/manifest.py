"""A checkpoint's `manifest.json`: the sha256 of every file in the checkpoint folder, written last, and
checked before anything in the folder is read. It sits beside the files, so it catches corruption but
not tampering; that is why nothing in a checkpoint is ever unpickled."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import UserError
from ..files import sha256_file, write_json
from .state import RESTART_HINT

MANIFEST = "manifest.json"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Files older linearize versions wrote with torch.save: refused by name, never opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin")
# The manifest's "engine" key of checkpoints written through DeepSpeed (linearize.train.distributed).
DEEPSPEED_ENGINE = "deepspeed"
ADVICE = "delete it to resume from an earlier checkpoint, or delete the stage dir to start over"


def malformed(checkpoint: Path, name: str, why) -> UserError:
    return UserError(f"checkpoint {checkpoint} is malformed: {name} ({why}); {ADVICE}")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(tmp: Path, header: dict) -> None:
    """`manifest.json` = header + the sha256 of every file under `tmp`; then fsyncs files and folders."""
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    manifest = {**header, "files": {name: sha256_file(tmp / name) for name in files}}
    write_json(tmp / MANIFEST, manifest)
    for name in files + [MANIFEST]:
        fsync_path(tmp / name)
    for folder in sorted({(tmp / name).parent for name in files} | {tmp}, reverse=True):
        fsync_path(folder)


def _check_file_name(path: Path, name: str, nested: bool) -> None:
    """A manifest entry must name a file inside the checkpoint: never hash or open anything outside it.
    Only DeepSpeed checkpoints have subfolders (its `engine/` files)."""
    parts = name.split("/")
    escapes = (not name or "\\" in name or "\x00" in name or name.startswith("/") or name == MANIFEST
               or any(part in ("", ".", "..") for part in parts) or (len(parts) > 1 and not nested))
    if escapes:
        raise malformed(path, MANIFEST, f"it lists {name!r}, which is not a file name inside the checkpoint")


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"checkpoint {path} is corrupt: unreadable {MANIFEST} ({err}); {ADVICE}") from None
    if not isinstance(manifest, dict):
        raise malformed(path, MANIFEST, "not a JSON object")
    if not isinstance(manifest.get("files"), dict):
        raise malformed(path, MANIFEST, 'no "files" mapping of file name to sha256')
    nested = manifest.get("engine") == DEEPSPEED_ENGINE
    for name, digest in manifest["files"].items():
        _check_file_name(path, name, nested)
        if not isinstance(digest, str) or not SHA256_HEX.match(digest):
            raise malformed(path, MANIFEST, f"the hash of {name!r} is not a sha256 hex string")
    return manifest


def _refuse_pickles(path: Path, manifest: dict) -> None:
    """Our own files are never pickles; older versions wrote optimizer.pt / rng.pt (rng_rank<r>.pt under
    DeepSpeed). They are refused without being opened: a crafted one runs code when unpickled."""
    for name in manifest["files"]:
        if "/" not in name and name.endswith(PICKLE_SUFFIXES):
            raise UserError(
                f"checkpoint {path} holds {name}, a pickle (older linearize format) that could run code "
                f"when loaded, so it is not read; use {RESTART_HINT} (or delete {path.parent})")


def _check_files(path: Path, files: dict) -> None:
    root = path.resolve()
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise UserError(f"checkpoint {path} is corrupt: {', '.join(missing)} is missing; {ADVICE}")
    for name, expected in files.items():
        if not (path / name).resolve().is_relative_to(root):
            raise malformed(path, MANIFEST, f"{name} links outside the checkpoint")
        if sha256_file(path / name) != expected:
            raise UserError(f"checkpoint {path} is corrupt: {name} does not match its sha256; {ADVICE}")


def verify_checkpoint(path: Path) -> dict:
    """Checks the manifest (well-formed, names inside the checkpoint, no pickled files of ours) and
    every file's sha256; returns the manifest. Raises UserError naming the checkpoint and the problem
    (malformed manifest, truncated, missing or altered file)."""
    path = Path(path)
    manifest = read_manifest(path)
    _refuse_pickles(path, manifest)
    try:
        _check_files(path, manifest["files"])
    except OSError as err:
        raise UserError(f"checkpoint {path} is unreadable: {err}; {ADVICE}") from None
    return manifest


def require_files(path: Path, manifest: dict, names) -> None:
    """The files a loader reads must be hash-verified: refuses a manifest that does not list them."""
    unlisted = [name for name in names if name not in manifest["files"]]
    if unlisted:
        raise UserError(f"checkpoint {path} is incomplete: {MANIFEST} does not list {', '.join(unlisted)}; {ADVICE}")
