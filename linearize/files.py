"""File helpers every layer shares."""
from __future__ import annotations

import hashlib
from pathlib import Path

# Read in 1 MiB blocks: constant memory for multi-GB weight files.
HASH_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()
