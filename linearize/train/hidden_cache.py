"""The teacher's hidden states at block boundaries, computed once per sequence and kept on disk within a
budget, for block-wise attention transfer.

Block b (decoder layers s_b .. s_{b+1}-1) trains on the teacher's hidden states at the input of layer
s_b. The cache runs the teacher block by block (one block loaded at a time) over every sequence that
training and the in-stage evaluation will read, once, and stores the output at each boundary as
`<root>/layer_<s>/shard_<i>.safetensors` (tensor `hidden` `[rows, L, D]` in the cache dtype), then
`index.json` last: a boundary without its index is (re)built, a finished shard of the same cache key is
kept. Each shard carries the sha256 of its tensor's bytes in its header, verified once per process before
it is read (at every start of the stage, and before training reads it): a damaged, truncated or missing
shard is recomputed with one line saying so, so a resumed run trains on exactly the states an
uninterrupted one did. Rows are found by the sha1 of their token ids, so the loop's batches of token ids `[B, L]` map to
hidden states `[B, L, D]` without the loop knowing.

Disk: `boundary_bytes` = rows × L × D × itemsize per stored boundary, for every block start but the
first (its input is the embeddings, looked up on the fly). Boundaries are stored from the first block
upwards while they fit the budget; a block above the last stored one recomputes its input every step
from that boundary (or from the embeddings) through the teacher layers in between, which it then holds
in memory too."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..dtypes import DTYPES
from ..errors import UserError
from ..files import save_safetensors, tensor_sha256, write_json
from ..models.lazy import LazyDecoder, SafetensorsReader
from .engine import autocast_context
from .sampler import sample_indices

INDEX_FILE = "index.json"
HIDDEN = "hidden"
CONTENT_HASH = "sha256"  # a shard's metadata key: sha256 of its tensor's bytes
INDEX_KEYS = {"key": str, "rows": int, "shard_rows": int, "shards": int, "dtype": str}
# Shards of about this size: big enough to write efficiently, small enough to hold one in memory while
# the next boundary's shard is computed from it.
SHARD_BYTES = 256 * 2**20
GB = 10**9  # attention_transfer.cache_gb counts decimal gigabytes, as disks are sold


def row_key(row: torch.Tensor) -> str:
    """sha1 of one sequence's token ids `[L]` (its bytes as int64)."""
    return hashlib.sha1(row.detach().cpu().to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def wanted_rows(train_tokens: torch.Tensor, eval_tokens: torch.Tensor, stage_cfg, seed: int,
                shuffle: bool, first_rows: int = 0) -> torch.Tensor:
    """The distinct sequences `[R, L]` a stage will read: the first `first_rows` training rows
    (calibration), the training rows at stream positions 0 .. max_steps × micro_batch_size × grad_accum − 1
    (in first-read order), then the eval rows."""
    positions = stage_cfg.max_steps * stage_cfg.micro_batch_size * stage_cfg.grad_accum
    order = sample_indices(0, positions, len(train_tokens), seed, shuffle) if positions else torch.zeros(0, dtype=torch.long)
    rows, seen = [], set()
    for row in [*train_tokens[:first_rows], *train_tokens[order], *eval_tokens]:
        key = row_key(row)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return torch.stack(rows)  # [R, L]


@dataclass(frozen=True)
class CachePlan:
    """Which block inputs are stored: `stored` (first layers of blocks, ascending) out of `starts`."""

    starts: tuple[int, ...]  # first layer of every block but the first
    stored: tuple[int, ...]
    boundary_bytes: int
    budget_bytes: int

    def nearest_stored(self, start: int) -> Optional[int]:
        """The highest stored boundary at or below `start`; None: the embeddings."""
        below = [s for s in self.stored if s <= start]
        return below[-1] if below else None

    def summary(self) -> str:
        need, have = len(self.starts) * self.boundary_bytes, self.budget_bytes
        if len(self.stored) == len(self.starts):
            return (f"caching the teacher's hidden states at {len(self.starts)} block inputs: "
                    f"{need / GB:.3g} GB of the {have / GB:.3g} GB budget")
        recomputed = [s for s in self.starts if s not in self.stored]
        return (f"the hidden-state cache needs {need / GB:.3g} GB for {len(self.starts)} block inputs and "
                f"attention_transfer.cache_gb allows {have / GB:.3g} GB: storing {len(self.stored)}, recomputing "
                f"the inputs of the blocks at layers {recomputed} from the teacher every step instead")


def plan_cache(block_starts: list[int], rows: int, seq_len: int, hidden_size: int, dtype: torch.dtype,
               budget_bytes: int) -> CachePlan:
    """Stores boundaries from the lowest up while `budget_bytes` allows."""
    starts = tuple(s for s in block_starts if s > 0)
    per_boundary = rows * seq_len * hidden_size * torch.empty(0, dtype=dtype).element_size()
    fits = len(starts) if per_boundary == 0 else min(len(starts), budget_bytes // per_boundary)
    return CachePlan(starts, starts[:fits], per_boundary, budget_bytes)


class HiddenCache:
    """The stored boundaries of one cache (see the module docstring): `rows` `[R, L]` in cache order."""

    def __init__(self, root: Path, rows: torch.Tensor, dtype: torch.dtype, identity: dict):
        self.root, self.rows, self.dtype = Path(root), rows, dtype
        self.keys = [row_key(row) for row in rows]
        self.position = {key: i for i, key in enumerate(self.keys)}
        self.identity = identity
        self._readers: dict[int, dict[int, SafetensorsReader]] = {}
        self._verified: set[tuple[Path, int, int]] = set()  # (path, size, mtime_ns) of shards checked here

    def shard_rows(self, hidden_size: int) -> int:
        row_bytes = self.rows.shape[1] * hidden_size * torch.empty(0, dtype=self.dtype).element_size()
        return max(1, SHARD_BYTES // row_bytes)

    def key(self, start: int) -> str:
        """What a boundary's files must have been computed from: rows, dtypes, teacher, layer."""
        rows = hashlib.sha256("".join(self.keys).encode()).hexdigest()
        text = json.dumps({**self.identity, "rows": rows, "layer": start, "dtype": str(self.dtype)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def folder(self, start: int) -> Path:
        return self.root / f"layer_{start}"

    def read_index(self, start: int) -> Optional[dict]:
        """The boundary's index, checked (INDEX_KEYS); None when it is missing or damaged (then rebuilt)."""
        path = self.folder(start) / INDEX_FILE
        if not path.exists():
            return None
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError):
            index = None
        if not (isinstance(index, dict) and all(isinstance(index.get(k), t) for k, t in INDEX_KEYS.items())):
            return None
        return index

    def complete(self, start: int) -> bool:
        index = self.read_index(start)
        return index is not None and index["key"] == self.key(start)

    def _shard_path(self, start: int, shard: int) -> Path:
        return self.folder(start) / f"shard_{shard:05d}.safetensors"

    def shard_problem(self, start: int, shard: int) -> Optional[str]:
        """Why shard `shard` of boundary `start` cannot be used ("missing", "from another cache key",
        "truncated", "damaged"), or None when its content hash verifies (checked once per process)."""
        path = self._shard_path(start, shard)
        if not path.is_file():
            return "missing"
        stat = path.stat()
        stamp = (path, stat.st_size, stat.st_mtime_ns)
        if stamp in self._verified:
            return None
        try:
            reader = SafetensorsReader([path])
            metadata = reader.metadata[path]
            if metadata.get("key") != self.key(start):
                return "from another cache key"
            hidden = reader.read(HIDDEN)
        except Exception:  # a header or body that safetensors' layout does not describe
            return "truncated"
        if metadata.get(CONTENT_HASH) != tensor_sha256(hidden):
            return "damaged (its content hash differs)"
        self._verified.add(stamp)
        return None

    def build(self, decoder: LazyDecoder, blocks: list[list[int]], plan: CachePlan, *, batch_size: int,
              autocast: str, device: torch.device, rank: int = 0, world: int = 1,
              barrier: Callable[[], None] = lambda: None, log: Optional[Callable[[str], None]] = None) -> None:
        """Writes every stored shard that is not there and verified, one block loaded at a time (a shard
        of a finished boundary that fails its check is recomputed, saying so); shard i is computed by
        rank i % world (each rank runs its shards through every block), rank 0 writes the indexes."""
        log = log or print  # looked up now: a default bound at import would keep whatever print was then
        hidden_size = decoder.config.get_text_config(decoder=True).hidden_size
        per_shard = self.shard_rows(hidden_size)
        shards = range(0, len(self.rows), per_shard)
        embeddings = None
        previous: Optional[int] = None
        for layers in blocks:
            target = layers[-1] + 1
            if target not in plan.stored:
                break
            finished = self.complete(target)
            mine = []
            for i in range(len(shards)):
                problem = self.shard_problem(target, i) if i % world == rank else None
                if problem is not None:
                    mine.append(i)
                    if finished or problem not in ("missing", "from another cache key"):
                        log(f"hidden-state cache: {self._shard_path(target, i)} is {problem}; recomputing it")
            if mine:
                decoder.load(layers)
                decoder.to(device)
                if previous is None and embeddings is None:
                    embeddings = decoder.embedding_weight()
                for shard in mine:
                    first = shards[shard]
                    inputs = (decoder.embed(self.rows[first:first + per_shard], embeddings) if previous is None
                              else self.read_shard(previous, shard))
                    self._write_shard(target, shard, self._run(decoder, inputs, batch_size, autocast, device))
                decoder.release(layers)
            barrier()
            if rank == 0 and not finished:
                write_json(self.folder(target) / INDEX_FILE,
                           {"key": self.key(target), "rows": len(self.rows), "shard_rows": per_shard,
                            "shards": len(shards), "dtype": str(self.dtype)})
            barrier()
            previous, embeddings = target, None  # only the first block reads the embeddings

    def _run(self, decoder: LazyDecoder, inputs: torch.Tensor, batch_size: int, autocast: str,
             device: torch.device) -> torch.Tensor:
        """The loaded teacher layers over `inputs` `[n, L, D]` in micro-batches → `[n, L, D]` in the cache dtype."""
        outputs = []
        with torch.no_grad():
            for first in range(0, len(inputs), batch_size):
                batch = inputs[first:first + batch_size].to(device=device, dtype=decoder.dtype)  # [B, L, D]
                with autocast_context(autocast, device):
                    outputs.append(decoder(batch).to(device="cpu", dtype=self.dtype))
        return torch.cat(outputs)

    def _write_shard(self, start: int, shard: int, hidden: torch.Tensor) -> None:
        path = self._shard_path(start, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        hidden = hidden.contiguous()
        save_safetensors({HIDDEN: hidden}, path, metadata={"key": self.key(start), CONTENT_HASH: tensor_sha256(hidden)})
        stat = path.stat()
        self._verified.add((path, stat.st_size, stat.st_mtime_ns))  # written from these very bytes

    def _reader(self, start: int, shard: int) -> SafetensorsReader:
        readers = self._readers.setdefault(start, {})
        if shard not in readers:
            problem = self.shard_problem(start, shard)
            if problem is not None:
                raise UserError(f"hidden-state cache {self._shard_path(start, shard)} is {problem}; run the stage "
                                "again (`linearize run` resumes and recomputes the shard)")
            readers[shard] = SafetensorsReader([self._shard_path(start, shard)])
        return readers[shard]

    def read_shard(self, start: int, shard: int) -> torch.Tensor:
        return self._reader(start, shard).read(HIDDEN)

    def lookup(self, start: int, input_ids: torch.Tensor, hidden_size: int) -> torch.Tensor:
        """The stored hidden states `[B, L, D]` (cache dtype, CPU) at boundary `start` of rows `input_ids` `[B, L]`."""
        per_shard = self.shard_rows(hidden_size)
        out = []
        for row in input_ids:
            key = row_key(row)
            if key not in self.position:
                raise RuntimeError(f"sequence {key[:12]} is not in the hidden-state cache {self.folder(start)}")
            shard, offset = divmod(self.position[key], per_shard)
            out.append(self._reader(start, shard).read_rows(HIDDEN, offset, 1))
        return torch.cat(out)


def cache_dtype(name: Optional[str], model_dtype: torch.dtype) -> torch.dtype:
    """attention_transfer.cache_dtype (a DTYPES name; None = the model's dtype)."""
    return model_dtype if name is None else DTYPES[name]


class BlockInputs:
    """The teacher's hidden states `[B, L, D]` at the input of one block for batches of token ids `[B, L]`:
    the nearest stored boundary at or below the block (or the embeddings), then the teacher layers between
    it and the block, held by `prefix` (a LazyDecoder with those layers loaded), if any."""

    def __init__(self, cache: HiddenCache, source: Optional[int], prefix: Optional[LazyDecoder],
                 embeddings: Optional[torch.Tensor], dtype: torch.dtype, hidden_size: int):
        self.cache, self.source, self.prefix = cache, source, prefix
        self.embeddings, self.dtype, self.hidden_size = embeddings, dtype, hidden_size

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.source is None:
                hidden = torch.nn.functional.embedding(input_ids, self.embeddings)  # [B, L, D]
            else:
                hidden = self.cache.lookup(self.source, input_ids, self.hidden_size)  # [B, L, D]
            hidden = hidden.to(device=input_ids.device, dtype=self.dtype)
            return hidden if self.prefix is None else self.prefix(hidden)
