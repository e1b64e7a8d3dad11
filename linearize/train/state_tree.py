"""State trees (optimizer, grad scaler, RNG) as safetensors files that hold no pickles: every tensor is
stored by a generated name, everything else as JSON in the file's metadata under `STRUCTURE_KEY`. JSON
objects are always tags, so lists, tuples and dicts with int keys (optimizer state is keyed by parameter
index) come back as they went in."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..files import save_safetensors

# The safetensors metadata key under which a state tree's structure (JSON) is stored.
STRUCTURE_KEY = "linearize.structure"
# What reading a damaged or foreign file can raise: the caller names the file.
READ_ERRORS = (OSError, SafetensorError, KeyError, TypeError, ValueError, RecursionError)


def encode(value, tensors: dict):
    """The JSON structure of `value`; its tensors are added to `tensors` under generated names."""
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        if not all(isinstance(key, (str, int)) for key in value):
            raise TypeError(f"a checkpointed dict has keys that are not str or int: {list(value)[:3]}")
        return {"dict": [[key, encode(item, tensors)] for key, item in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [encode(item, tensors) for item in value]}
    if isinstance(value, list):
        return [encode(item, tensors) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def decode(node, tensors: dict):
    """Inverse of `encode`; ValueError on anything `encode` does not write."""
    if isinstance(node, list):
        return [decode(item, tensors) for item in node]
    if not isinstance(node, dict):
        return node
    if node.keys() == {"tensor"} and node["tensor"] in tensors:
        return tensors[node["tensor"]]
    if node.keys() == {"tuple"} and isinstance(node["tuple"], list):
        return tuple(decode(item, tensors) for item in node["tuple"])
    if node.keys() == {"dict"} and isinstance(node["dict"], list):
        pairs = node["dict"]
        if all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int)) for p in pairs):
            return {key: decode(item, tensors) for key, item in pairs}
    raise ValueError(f"unexpected entry {json.dumps(node)[:80]}")


def write_tree(path: Path, tree) -> None:
    tensors = {}
    structure = encode(tree, tensors)
    save_safetensors(tensors, path, metadata={STRUCTURE_KEY: json.dumps(structure)})


def read_tree(path: Path):
    """The tree `write_tree` stored at `path`; one of READ_ERRORS when the file is damaged or foreign."""
    with safe_open(path, "pt") as handle:
        structure = json.loads((handle.metadata() or {})[STRUCTURE_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return decode(structure, tensors)


def rng_state() -> dict:
    """This process's RNG states: python, numpy, torch and (if any) cuda."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    # numpy's MT19937 key is uint32 [624]; int64 holds it exactly in a format safetensors reads anywhere.
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                   float(cached_gaussian))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state) -> None:
    """Inverse of `rng_state`; KeyError, TypeError, ValueError, AttributeError or RuntimeError when
    `state` is not one."""
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
