"""File helpers every layer shares: the one atomic writer, and the sha256 of a file.

Every file a run, `compare` or `export` writes goes through `atomic_path` (or a helper built on it):
the bytes go to a hidden temp file beside the target, which is fsynced and renamed over the target only
when complete. So a reader never sees half a file, and a failed write leaves the previous file
byte-identical and no temp file behind. Any library's write error (an OSError, safetensors'
`SafetensorError` carrying "os error 28", PIL's or matplotlib's wrapped OSError) that is the machine's
fault becomes a `WriteFault`: one line naming the path and the cause (disk full, read-only file system,
permission denied, file too large, ...). Other exceptions are bugs and keep their traceback."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Iterator, Optional

from .errors import UserError, one_line

# Read in 1 MiB blocks: constant memory for multi-GB weight files.
HASH_BLOCK = 1 << 20
# The machine's write faults, by errno, as the one word a user acts on.
CAUSES = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "file too large",
}
# Rust's io::Error (safetensors) ends its message with "(os error N)".
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# Temp files are hidden siblings: `.<name>.tmp-<pid>-<random>`.
TMP_MARK = ".tmp-"
# A new file's mode before the umask, as `open(path, "w")` creates it.
NEW_FILE_MODE = 0o666


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(tensor) -> str:
    """sha256 of a CPU tensor's bytes (any dtype, bfloat16 included)."""
    import torch

    return hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


# --------------------------------------------------------------------------------------------- write faults


class WriteFault(UserError, OSError):
    """A write that failed for the machine's reasons (disk full, read-only, permissions, size limit).
    A UserError (one line, no traceback) and still an OSError, so code that handles a machine's write
    faults as OSErrors (naming what survived) handles it too."""

    def __init__(self, path: Path, cause: str, detail: str):
        self.path, self.cause, self.detail = Path(path), cause, detail
        OSError.__init__(self, f"cannot write {path}: {cause} ({detail})" if detail and detail != cause
                         else f"cannot write {path}: {cause}")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or during (PIL and matplotlib wrap the OSError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def fault_cause(exc: BaseException) -> Optional[str]:
    """The cause ("disk full", "read-only file system", ...) when `exc` is a write fault of the machine,
    from its errno or (libraries that raise their own types) its message; None for anything else (a bug)."""
    for err in _chain(exc):
        if isinstance(err, OSError) and err.errno in CAUSES:
            return CAUSES[err.errno]
        text = str(err)
        for code in map(int, RUST_OS_ERROR.findall(text)):
            if code in CAUSES:
                return CAUSES[code]
        for code, cause in CAUSES.items():
            if os.strerror(code) in text:
                return cause
    if isinstance(exc, OSError):  # any other OSError while writing (I/O error, a vanished folder) is the machine's
        return exc.strerror or type(exc).__name__
    return None


def as_write_fault(path: Path, exc: BaseException) -> Optional[WriteFault]:
    """`exc` as a WriteFault naming `path`, or None when it is not a write fault (a bug: re-raise it)."""
    if isinstance(exc, WriteFault):
        return exc if exc.path == Path(path) else WriteFault(path, exc.cause, f"{exc.path.name}: {exc.detail}")
    cause = fault_cause(exc)
    if cause is None:
        return None
    return WriteFault(path, cause, one_line(exc))


@contextlib.contextmanager
def faults_named(path: Path) -> Iterator[None]:
    """Turns a write fault raised in the block into a WriteFault naming `path` (for writes into a folder
    that is itself published atomically: a checkpoint, an export)."""
    try:
        yield
    except Exception as exc:
        fault = as_write_fault(path, exc)
        if fault is None:
            raise
        raise fault from None


# --------------------------------------------------------------------------------------------- the writer


def temp_name(path: Path) -> Path:
    """A fresh hidden sibling of `path` for a write in progress."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a folder; the rename is still atomic
        _fsync(folder)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temp path beside `path` for a library that writes by path (safetensors, matplotlib); when
    the block succeeds the temp file is fsynced and renamed to `path`. On any failure the temp file is
    removed and `path` is untouched; a write fault is raised as a WriteFault naming `path`."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        # Created here, not by the library: the mode follows the umask, as for a plain open().
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, NEW_FILE_MODE))
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        # A library may replace the file with its own (safetensors 0.8 writes a private 0o600 temp file and
        # renames it over the path): the result keeps the mode a plain open() gives, so that a student or an
        # export is readable by whoever the umask lets read it.
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except Exception as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        fault = as_write_fault(path, exc)
        if fault is None:
            raise
        raise fault from None
    except BaseException:  # KeyboardInterrupt, SystemExit: no temp file left, the signal goes on
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w", encoding: Optional[str] = None) -> Iterator:
    """An open handle (mode "w" / "wb") whose content replaces `path` only if the block succeeds."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens for writing only ('w' or 'wb'), not {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()


def write_bytes(path: Path, data: bytes) -> Path:
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    with atomic_write(path) as handle:
        handle.write(text)
    return Path(path)


def write_json(path: Path, data, *, indent: Optional[int] = 2, sort_keys: bool = False) -> Path:
    """`data` as JSON (ending in a newline when indented)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys)
    return write_text(path, text + "\n" if indent is not None else text)


def write_jsonl(path: Path, records) -> Path:
    """One JSON object per line."""
    return write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def write_yaml(path: Path, content) -> Path:
    """Already-rendered yaml text, or a plain dict rendered here (linearize reads no yaml; writing the
    resolved config is a text file like any other)."""
    if not isinstance(content, str):
        import yaml

        content = yaml.safe_dump(content, sort_keys=False)
    return write_text(path, content)


def save_safetensors(state: dict, path: Path, metadata: Optional[dict] = None) -> Path:
    """`state` (name → tensor) as a safetensors file."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def save_figure(fig, path: Path, dpi: int = 120) -> Path:
    """A matplotlib figure as a PNG, through the figure's own canvas (no global backend)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def remove_stale_temps(folder: Path) -> None:
    """Deletes temp files that a killed process left in `folder` (never renamed in, so never read)."""
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(f".*{TMP_MARK}*"):
            if leftover.is_file():
                with contextlib.suppress(OSError):
                    leftover.unlink()
