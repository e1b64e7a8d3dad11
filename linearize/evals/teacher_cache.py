"""Teacher measurements kept between the evaluations of students of one teacher
(`evaluate.behaviour.teacher_cache`; `linearize compare` sets it to a folder of its output).

Every student of a table is measured against the same teacher on the same prompts: the teacher's retrieval
results and its greedy answers (with the logits at each answer's first position) come out the same every
time, and they cost about as much as the student's own. A cache entry is keyed by

- the weights the teacher view computes with (`teacher_digest`): every parameter and buffer of the model
  outside the converted layers' mechanisms and the LoRA adapter, under the unconverted model's names, so
  that students with other softmax layers, mechanisms or adapters of one teacher share it, while a teacher
  whose weights were changed in place (a trained base weight, another dtype) does not;
- what was measured: the exact prompt tokens where the caller has them (agreement), otherwise the
  measurement's settings with the tokenizer and the source of the module that builds the prompts
  (retrieval), so that a change of prompt format is a new key.

Entries are `<name>-<key>.json` (results) and `<name>-<key>.safetensors` (tensors), written atomically;
nothing is unpickled. An entry that does not read back is measured again and replaced. A process that is about
to measure an entry holds an exclusive `flock` on `.<entry>.lock` meanwhile, so that students evaluated side by
side (compare rows in parallel) wait for one measurement of the teacher instead of each making its own; the
kernel drops the lock when its holder dies, so a killed evaluation leaves nothing to clean up."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..files import faults_named, save_safetensors, tensor_sha256, write_json

# Name segments of wrappers around the teacher's own modules: peft's LoRA layers and the converted
# attentions keep the original module under `base_layer`, and peft prefixes the whole model.
_WRAPPER_SEGMENTS = re.compile(r"(^base_model\.model\.)|(\.base_layer(?=\.))")
# Parameters the teacher view never computes with: the converted layers' mechanisms and LoRA's matrices.
_NOT_TEACHER = re.compile(r"(^|\.)(mechanism|lora_[A-Za-z_]+)\.")
KEY_CHARS = 32  # hex digits of sha256 in a file name: 128 bits
LOCK_SUFFIX = ".lock"


def teacher_name(name: str) -> Optional[str]:
    """The unconverted model's name for a parameter or buffer of the (converted, LoRA-wrapped) model, or
    None when the teacher view does not use it."""
    if _NOT_TEACHER.search(name):
        return None
    return _WRAPPER_SEGMENTS.sub("", name)


def teacher_digest(model: torch.nn.Module) -> str:
    """sha256 over the teacher view's weights (name, dtype, shape and bytes, sorted by name) and the end
    tokens greedy decoding stops at."""
    tensors = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        plain = teacher_name(name)
        if plain is not None:
            tensors[plain] = tensor
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{tensor_sha256(t)}|".encode())
    generation = getattr(model, "generation_config", None)
    digest.update(json.dumps(getattr(generation, "eos_token_id", None)).encode())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what turns a prompt text into ids: the tokenizer's full definition (fast tokenizers) or its
    vocabulary, its special prefix and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(json.dumps([text, prefix, template]).encode()).hexdigest()


def source_digest(module) -> str:
    """sha256 of a module's source: the prompts it builds change only with it."""
    return hashlib.sha256(inspect.getsource(module).encode()).hexdigest()


def tokens_digest(prompts) -> str:
    """sha256 of a sequence of 1-D LongTensors (their lengths and ids)."""
    return hashlib.sha256("|".join(tensor_sha256(p.detach().cpu().to(torch.int64)) for p in prompts).encode()).hexdigest()


def _read(path: Path, load: Callable):
    """`load(path)`, or None when the entry is absent or damaged (not JSON, not safetensors): measured again."""
    try:
        return load(path)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _entry_lock(path: Path) -> Iterator[bool]:
    """Holds an exclusive lock beside entry `path` for the block, waiting for another process that holds it;
    yields whether it waited."""
    lock = path.with_name(f".{path.name}{LOCK_SUFFIX}")
    with faults_named(lock):  # a folder it cannot write in: one line naming the file
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class TeacherCache:
    """Teacher measurements in `folder`. Each lookup names the model whose teacher view is measured (a
    converted student, or a separate teacher model); its digest is taken once per model. `hits` / `misses`
    count lookups, and `waits` the lookups that waited for another process's measurement, for the caller's
    log."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._digests: dict[int, str] = {}
        self.hits = self.misses = self.waits = 0

    def _path(self, model: torch.nn.Module, name: str, parts: dict, suffix: str) -> Path:
        if id(model) not in self._digests:
            self._digests[id(model)] = teacher_digest(model)
        device = next(model.parameters()).device.type  # other kernels, other last bits
        key = json.dumps({"teacher": self._digests[id(model)], "device": device, "name": name, **parts}, sort_keys=True)
        return self.folder / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:KEY_CHARS]}{suffix}"

    def _lookup(self, path: Path, load: Callable, save: Callable, measure: Callable):
        """What `load(path)` reads, or (when it cannot: absent, damaged) `measure()` saved there by `save`."""
        cached = _read(path, load)
        if not cached:
            with _entry_lock(path) as waited:
                self.waits += waited
                cached = _read(path, load)  # measured by another process while this one waited
                if not cached:
                    self.misses += 1
                    save(path, measure())
                    return load(path)  # what a hit returns: the same types every time
        self.hits += 1
        return cached

    def results(self, model: torch.nn.Module, name: str, parts: dict, measure: Callable[[], dict]) -> dict:
        """JSON results of `measure()` (the teacher view of `model` measured under (`name`, `parts`)),
        measured only when not cached."""
        def load(path: Path):
            value = json.loads(path.read_text())
            return value if isinstance(value, dict) else None

        return self._lookup(self._path(model, name, parts, ".json"), load, write_json, measure)

    def tensors(self, model: torch.nn.Module, name: str, parts: dict,
                measure: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Tensors of `measure()` (name -> tensor), as `results`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        def load(path: Path):
            try:
                return load_file(str(path))
            except SafetensorError as exc:  # a damaged file reads as one that is not there
                raise ValueError(str(exc)) from None

        def save(path: Path, result: dict) -> None:
            save_safetensors({k: v.detach().cpu().contiguous() for k, v in result.items()}, path)

        return self._lookup(self._path(model, name, parts, ".safetensors"), load, save, measure)
