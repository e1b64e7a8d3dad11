"""Lazily loaded teachers: only the weights a block-wise stage needs, read from the checkpoint's
safetensors files one tensor at a time, so peak memory grows with the loaded block, not with the model.

- `SafetensorsReader(model_dir)` indexes every tensor of `model.safetensors` (or of the shards named by
  `model.safetensors.index.json`) from the files' headers, and reads a tensor (or rows of its first
  dimension) with plain file reads: no memory map, so a model far larger than the process's address-space
  limit is never mapped whole.
- `LazyDecoder(reader, dtype)` is the model's decoder built on the meta device: every layer slot holds a
  `PassThrough` until `load(indices)` materializes those layers from the files (`release` frees them); the
  final norm is left out and the embeddings are read on demand (`embed`). `decoder(inputs_embeds=h)` then
  runs exactly the loaded layers on `h`, with the architecture's own mask and rotary-position code. Its
  parameter names are those of the full `*ForCausalLM` (`model.layers.3.self_attn...`), so student files
  written from it load into the whole model."""
from __future__ import annotations

import copy
import json
import math
import struct
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import UserError
from .teacher import TEACHER_ATTN_IMPLEMENTATION

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The safetensors header: a little-endian u64 length, then that many bytes of JSON.
HEADER_LENGTH = struct.Struct("<Q")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def model_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model folder (sharded or not)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise UserError(f"{model_dir} has no {SINGLE_FILE} or {INDEX_FILE}: block-wise transfer reads the "
                    "teacher's layers lazily from safetensors files (save the model with save_pretrained)")


class SafetensorsReader:
    """Where every tensor of some safetensors files lies: name → (file, dtype, shape, byte offset); each
    file's `__metadata__` in `metadata`."""

    def __init__(self, files: Iterable[Path], model_dir: Path | None = None):
        self.entries: dict[str, tuple[Path, torch.dtype, list[int], int]] = {}
        self.metadata: dict[Path, dict] = {}
        files = [Path(path) for path in files]
        self.model_dir = Path(model_dir) if model_dir is not None else files[0].parent
        for path in files:
            self._index(path)

    @classmethod
    def for_model(cls, model_dir: Path) -> "SafetensorsReader":
        return cls(model_files(model_dir), model_dir)

    def _index(self, path: Path) -> None:
        try:
            with open(path, "rb") as handle:
                (length,) = HEADER_LENGTH.unpack(handle.read(HEADER_LENGTH.size))
                header = json.loads(handle.read(length))
        except (OSError, struct.error, ValueError) as err:
            raise UserError(f"{path} is not a readable safetensors file ({err})") from None
        data_start = HEADER_LENGTH.size + length
        self.metadata[path] = header.get("__metadata__") or {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which linearize does not read")
            self.entries[name] = (path, SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"]),
                                  data_start + info["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name)[2])

    def _entry(self, name: str):
        if name not in self.entries:
            raise UserError(f"{self.model_dir}: the checkpoint has no tensor {name!r}")
        return self.entries[name]

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor `name`, cast to `dtype` when given."""
        shape = self._entry(name)[2]
        return self.read_rows(name, 0, shape[0] if shape else 1, dtype).reshape(shape)

    def read_rows(self, name: str, start: int, count: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows `start .. start+count-1` of the first dimension of `name`: `[count, *shape[1:]]`."""
        path, stored, shape, offset = self._entry(name)
        row_shape = shape[1:] if shape else []
        out = torch.empty([count, *row_shape], dtype=stored)
        row_bytes = math.prod(row_shape) * out.element_size()
        buffer = out.reshape(-1).view(torch.uint8).numpy()  # [count · row_bytes] bytes, no copy
        with open(path, "rb") as handle:
            handle.seek(offset + start * row_bytes)
            if handle.readinto(buffer) != count * row_bytes:
                raise UserError(f"{path} is truncated: tensor {name} rows {start}..{start + count - 1} are missing")
        return out if dtype is None or dtype == stored else out.to(dtype)


class PassThrough(nn.Module):
    """Stands in for a decoder layer that is not loaded: hands the hidden states on unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class NotLoaded(nn.Module):
    """Stands in for the embeddings: a lazy decoder runs from `inputs_embeds` only."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("a LazyDecoder runs from inputs_embeds; read embeddings with LazyDecoder.embed")


class LazyDecoder(nn.Module):
    """A teacher's decoder whose layers are loaded on request (see the module docstring)."""

    def __init__(self, reader: SafetensorsReader, dtype: torch.dtype):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.reader, self.dtype = reader, dtype
        config = AutoConfig.from_pretrained(reader.model_dir, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False,
                                                        attn_implementation=TEACHER_ATTN_IMPLEMENTATION)
        decoder = skeleton.get_decoder()
        names = {id(module): name for name, module in skeleton.named_modules()}
        self.decoder_name = names[id(decoder)]
        if "." in self.decoder_name:
            raise UserError(f"{type(skeleton).__name__} keeps its decoder at {self.decoder_name}; block-wise "
                            "transfer supports models whose decoder is a direct child")
        self.config = skeleton.config
        self.layer_names = [names[id(layer)] for layer in decoder.layers]
        self.embed_name = f"{names[id(decoder.embed_tokens)]}.weight"
        self._templates = list(decoder.layers)  # meta modules: copied, then filled, by `load`
        decoder.layers = nn.ModuleList(PassThrough() for _ in self._templates)
        decoder.embed_tokens = NotLoaded()
        decoder.norm = nn.Identity()  # stage 1 never needs the final norm or the LM head
        # The rotary tables are buffers computed at construction: rebuild them on a real device.
        decoder.rotary_emb = type(decoder.rotary_emb)(config=decoder.config)
        self.add_module(self.decoder_name, decoder)

    @property
    def decoder(self) -> nn.Module:
        return getattr(self, self.decoder_name)

    @property
    def num_layers(self) -> int:
        return len(self._templates)

    def loaded(self) -> list[int]:
        return [i for i, layer in enumerate(self.decoder.layers) if not isinstance(layer, PassThrough)]

    def load(self, indices: Iterable[int]) -> None:
        """Materializes decoder layers `indices` on the CPU from the checkpoint, in `self.dtype`."""
        for idx in indices:
            if not isinstance(self.decoder.layers[idx], PassThrough):
                continue
            layer = copy.deepcopy(self._templates[idx])
            prefix = f"{self.layer_names[idx]}."
            state = {key: self.reader.read(prefix + key, self.dtype) for key in layer.state_dict()}
            layer.load_state_dict(state, strict=True, assign=True)
            left = [name for name, t in layer.state_dict().items() if t.is_meta]
            if left:
                raise UserError(f"layer {idx} has tensors the checkpoint does not fill: {left[:3]}")
            self.decoder.layers[idx] = layer.eval()

    def release(self, indices: Iterable[int] | None = None) -> None:
        """Frees decoder layers `indices` (default: all loaded ones)."""
        for idx in self.loaded() if indices is None else indices:
            self.decoder.layers[idx] = PassThrough()

    def embed(self, input_ids: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings `[B, L, D]` of `input_ids` `[B, L]`; pass `weight` (from `embedding_weight`)
        to avoid reading it again."""
        weight = self.embedding_weight() if weight is None else weight
        return nn.functional.embedding(input_ids.to(weight.device), weight)

    def embedding_weight(self) -> torch.Tensor:
        return self.reader.read(self.embed_name, self.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The loaded layers applied to `hidden_states` `[B, L, D]` (the others pass it on)."""
        return self.decoder(inputs_embeds=hidden_states, use_cache=False).last_hidden_state
