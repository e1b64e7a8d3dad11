"""The teacher's fingerprint: the sha256 of every weight, config and tokenizer file of the resolved model
folder (and of `model.tokenizer`'s folder when set), so a run notices a teacher replaced at the same path.

Hashing a big teacher takes a while, so each file's hash is cached in
`<cache>/fingerprints/hashes.json` by (resolved path, size, mtime_ns): a resume re-hashes only files
whose size or modification time changed. A hub id that is not a local folder is fingerprinted by its
name only (its files live in the hub's own cache, keyed by revision)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from ..files import sha256_file, write_json
from .assets import cache_dir

CACHE_FILE = "hashes.json"
# The files that make a model and its tokenizer: weights, configs, vocabularies, chat templates. READMEs,
# licences and hidden files (a `.git` folder, editor backups) do not change what the teacher computes.
MODEL_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".jinja",
                            ".tiktoken", ".py"})
SKIPPED_NAMES = frozenset({"README.md", "LICENSE", "LICENSE.txt", "NOTICE", "NOTICE.txt"})


def model_files(folder: Path) -> list[Path]:
    """The files of a model folder that decide what it computes (sorted, top level and subfolders)."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if path.suffix.lower() in MODEL_SUFFIXES and path.name not in SKIPPED_NAMES:
            found.append(path)
    return found


class HashCache:
    """sha256 per file, remembered by (resolved path, size, mtime_ns) in a small JSON file."""

    def __init__(self, path: Optional[Path] = None):
        self.path = Path(path) if path is not None else cache_dir("fingerprints") / CACHE_FILE
        self.entries = self._load()
        self.changed = False

    def _load(self) -> dict:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):  # no cache yet, or a damaged one: it is only a cache
            return {}
        return entries if isinstance(entries, dict) else {}

    def sha256(self, path: Path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = self.entries.get(str(path))
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = sha256_file(path)
        self.entries[str(path)] = {"stamp": stamp, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if self.changed:
            try:
                write_json(self.path, self.entries, indent=None)
            except OSError:  # a read-only cache folder costs a re-hash next time, nothing else
                pass
            self.changed = False


def folder_fingerprint(folder: Path, cache: HashCache) -> dict[str, str]:
    """relative file name → sha256 for the model files of `folder`."""
    return {str(path.relative_to(folder)): cache.sha256(path) for path in model_files(folder)}


def teacher_fingerprint(model_path: str, tokenizer: Optional[str] = None, cache: Optional[HashCache] = None) -> dict:
    """{"model.path", "files" (name → sha256, the tokenizer's under `tokenizer/`), "digest"} of a teacher
    spec (a folder, a gguf file, a registered name, a hub id), resolved as `load_teacher` resolves it."""
    from .teacher import resolve_model_path

    cache = cache or HashCache()
    files: dict[str, str] = {}
    for prefix, spec, key in (("", model_path, "model.path"), ("tokenizer/", tokenizer, "model.tokenizer")):
        if not spec:
            continue
        location = Path(resolve_model_path(spec, key))
        if location.is_dir():
            files.update({prefix + name: digest for name, digest in folder_fingerprint(location, cache).items()})
        else:  # a hub id: the name is all there is to record here
            files[prefix + "<hub id>"] = hashlib.sha256(spec.encode()).hexdigest()
    cache.save()
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"model.path": model_path, "model.tokenizer": tokenizer, "files": files, "digest": digest}


def changed_files(recorded: dict, current: dict) -> list[str]:
    """The file names whose hash differs, appeared or disappeared between two fingerprints."""
    old, new = recorded.get("files", {}), current.get("files", {})
    return sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
