"""What a run directory promises: one process at a time, and nothing deleted that linearize did not write.

- `run_lock(run_dir)`: an exclusive `flock` on `<run>/.lock`, which holds the holder's PID. The kernel
  drops the lock when its process dies (even by SIGKILL), so a stale lock file is simply taken over.
- `mark_stage(stage_dir, stage)`: writes `<stage_dir>/.linearize_stage` naming the stage. A stage folder
  is discarded (`discard_stage`) only if it carries that marker, or the DONE record of a linearize
  version from before markers existed.
- `discard_stage`: renames the folder to a hidden `.<stage>.discarded-<pid>` name first (one atomic
  step), then deletes that; an interruption leaves a hidden leftover (removed by the next run), never a
  half-deleted stage that still looks finished.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from linearize.errors import UserError
from linearize.models.exported import is_export_dir
from linearize.train.checkpoint import MANIFEST, latest_checkpoint
from linearize.train.state import DONE_FILE

LOCK_FILE = ".lock"
STAGE_MARKER = ".linearize_stage"
DISCARDED = re.compile(r"^\.(?P<stage>[\w-]+)\.discarded-\d+$")


def _lock_holder(handle) -> str:
    handle.seek(0)
    text = handle.read().strip()
    return f"process {text}" if text else "another process"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Holds `<run_dir>/.lock` for the block; UserError naming the holder's PID if another process has it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"{run_dir} is in use by {_lock_holder(handle)} (one process per run directory); "
                            "wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # the lock goes with the descriptor; an empty file names no holder
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def mark_stage(stage_dir: Path, stage: str) -> None:
    """Creates the stage folder (if needed) and records that linearize owns it."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    marker = stage_dir / STAGE_MARKER
    if not marker.is_file():
        tmp = stage_dir / f"{STAGE_MARKER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps({"stage": stage}) + "\n")
        os.replace(tmp, marker)


def _has_legacy_done(stage_dir: Path) -> bool:
    """A DONE record with the keys linearize writes (runs made before stage markers existed)."""
    try:
        record = json.loads((stage_dir / DONE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"metrics", "config"} <= record.keys()


def is_linearize_stage(stage_dir: Path) -> bool:
    """The stage marker, or (runs from before markers) a linearize DONE record or checkpoint."""
    stage_dir = Path(stage_dir)
    if (stage_dir / STAGE_MARKER).is_file() or _has_legacy_done(stage_dir):
        return True
    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is not None and (checkpoint / MANIFEST).is_file():
        return True
    return is_export_dir(stage_dir)  # the export stage replaces its folder, marker included


def check_owned(stage_dir: Path) -> None:
    """Refuses to run a stage into an existing, non-empty folder that linearize did not write."""
    stage_dir = Path(stage_dir)
    if stage_dir.is_dir() and any(stage_dir.iterdir()) and not is_linearize_stage(stage_dir):
        raise UserError(f"{stage_dir} exists but was not written by linearize (no {STAGE_MARKER} marker); "
                        "move it away or use another run_name")
    if stage_dir.exists() and not stage_dir.is_dir():
        raise UserError(f"{stage_dir} is a file, where linearize keeps a stage folder; move it away")


def discard_stage(stage_dir: Path) -> bool:
    """Deletes a linearize stage folder (rename, then delete). Returns False if there was none; refuses
    (UserError) a folder linearize did not write."""
    stage_dir = Path(stage_dir)
    if not stage_dir.exists():
        return False
    check_owned(stage_dir)
    aside = stage_dir.with_name(f".{stage_dir.name}.discarded-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(stage_dir, aside)
    shutil.rmtree(aside)
    return True


def remove_discard_leftovers(run_dir: Path) -> None:
    """Deletes hidden `.<stage>.discarded-<pid>` folders an interrupted discard left behind."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for leftover in run_dir.iterdir():
            if DISCARDED.match(leftover.name) and leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
