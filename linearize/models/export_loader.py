"""Loading an export directory: checks first (config.json and its `linearize` section well formed, the
bundled code exactly the recorded files), then the base architecture with `linearize_model` re-applied
and the saved weights, strictly. Never runs code from the directory."""
from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model

import linearize
from .. import adapters
from ..config.schema import AttentionConfig
from ..dtypes import DTYPES
from ..errors import UserError
from ..files import sha256_file
from . import hf
from .export_format import (ADAPTER_DIR, BUNDLE_KEY, CONFIG_FILE, SECTION, VERSION_KEY, WEIGHTS_FILE, layer_mechanisms,
                            read_config)

# Layers that stay softmax use the fastest exact implementation, as the teacher loader does.
ATTN_IMPLEMENTATION = "sdpa"
_warned_versions: set[str] = set()  # installed transformers versions already warned about in this process


def load_export(path: Path):
    """(model in eval mode, tokenizer) from an export directory: base architecture from config.json,
    `linearize_model` re-applied from the recorded section, then the saved weights (strict).

    Checks first, with a one-line UserError each: config.json and its section are well formed, and the
    bundled code files are exactly the recorded ones (sha256). Never runs code from the directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    data = read_config(path)
    if data is None or SECTION not in data:
        raise UserError(f"{path} is not a linearize export (no {CONFIG_FILE} with a `{SECTION}` section)")
    section = _checked_section(data[SECTION], path / CONFIG_FILE)
    verify_bundle(path, section)
    check_transformers_version(section.get(VERSION_KEY))
    hf.register_auto_classes()
    model = _build(path, section, AutoConfig, AutoModelForCausalLM)
    _load_weights(model, path)
    if (path / ADAPTER_DIR).is_dir():
        model = adapters.merge(adapters.attach(model, path / ADAPTER_DIR))
    # GenerationConfig loads no code, and an unknown keyword would become a generation attribute.
    model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _checked_section(section: Any, config_file: Path) -> dict:
    """The `linearize` section, or a one-line UserError when it lacks its `attention` / `layers` mappings."""
    problem = None
    if not isinstance(section, dict):
        problem = "is not a mapping"
    elif not isinstance(section.get("attention"), dict):
        problem = "has no `attention` mapping"
    elif not isinstance(section.get("layers"), dict) or not all(
            isinstance(m, str) and str(i).isdigit() for i, m in section["layers"].items()):
        problem = "has no `layers` mapping of layer index → mechanism"
    elif not isinstance(section.get(BUNDLE_KEY, {}), dict):
        problem = f"has a `{BUNDLE_KEY}` that is not a mapping of file name → sha256"
    if problem:
        raise UserError(f"{config_file}: the `{SECTION}` section {problem}; restore it or re-export")
    return section


def verify_bundle(path: Path, section: dict) -> None:
    """Refuses an export whose .py files are not exactly the recorded bundle: a file that differs from
    its sha256, a recorded file that is missing, or a .py file that is not recorded. An export written
    before the hashes were recorded is accepted only if it holds no .py file at all."""
    present = {p.relative_to(path).as_posix() for p in path.rglob("*.py")}
    recorded = section.get(BUNDLE_KEY)
    if recorded is None:
        if present:
            raise UserError(f"{path} records no hashes of its bundled code ({sorted(present)[0]}, ...): it was "
                            "written by an older linearize; re-export it with `linearize export`")
        return
    for name, digest in sorted(recorded.items()):
        file = path / name
        if Path(name).name != name or not name.endswith(".py"):
            raise UserError(f"{path / CONFIG_FILE}: `{SECTION}.{BUNDLE_KEY}` names {name!r}, not a file of the export")
        if not file.is_file():
            raise UserError(f"{file} is missing: the export's bundled code is incomplete; re-export it")
        if sha256_file(file) != digest:
            raise UserError(f"{file} does not match the sha256 recorded in {CONFIG_FILE}: the bundled code "
                            "was changed; re-export it")
    unrecorded = sorted(present - set(recorded))
    if unrecorded:
        raise UserError(f"{path / unrecorded[0]} is not part of the export's recorded code: remove it or re-export")


def tested_transformers():
    """The transformers versions linearize declares (a `packaging` SpecifierSet) from the installed
    package's metadata, or None where linearize is not installed as a package."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        requirements = importlib.metadata.requires("linearize") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if canonicalize_name(requirement.name) == "transformers" and requirement.marker is None:
            return requirement.specifier
    return None


def check_transformers_version(written_with: Optional[str]) -> None:
    """Warns (once per process) when the installed transformers is outside the declared range."""
    import transformers

    installed = transformers.__version__
    tested = tested_transformers()
    if tested is None or installed in _warned_versions or tested.contains(installed, prereleases=True):
        return
    _warned_versions.add(installed)
    warnings.warn(f"transformers {installed} is outside the range linearize is tested with ({tested}); this "
                  f"export was written with {written_with or 'an unrecorded version'}. Generation may be "
                  f"wrong: install transformers{tested}", stacklevel=3)


def _build(path: Path, section: dict, auto_config, auto_model) -> torch.nn.Module:
    """The converted model, before its weights, from config.json; a config that cannot build it is a UserError."""
    try:
        config = auto_config.from_pretrained(path, trust_remote_code=False)
        model = auto_model.from_config(config, attn_implementation=ATTN_IMPLEMENTATION, trust_remote_code=False)
        if not isinstance(model, tuple(model_class for _, model_class in hf.CLASSES.values())):
            # An export written before the linearize_<base> model types: a base config with the section.
            linearize.linearize_model(model, AttentionConfig(**section["attention"]))
    except (ValueError, TypeError, KeyError) as exc:  # a hand-edited or foreign config.json
        if "trust_remote_code" in str(exc):  # transformers' refusal: the model type exists only in auto_map code
            raise UserError(f"{path / CONFIG_FILE}: model type {_model_type(path)!r} is not one linearize "
                            "registers, and linearize never runs code from an export; re-export it") from None
        raise UserError(f"{path / CONFIG_FILE} does not describe a model linearize can build: "
                        f"{' '.join(str(exc).split())}") from None
    rebuilt = layer_mechanisms(getattr(model.config, SECTION))
    if rebuilt != layer_mechanisms(section):
        raise UserError(f"{path}: re-applying the recorded attention config gives layers {rebuilt}, "
                        f"but the export records {layer_mechanisms(section)}")
    return model


def _model_type(path: Path) -> Any:
    """The `model_type` config.json names (None when it names none)."""
    return (read_config(path) or {}).get("model_type")


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{weights} is missing: the export is incomplete; re-export it")
    first = next(iter(model.parameters()))
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, str) and dtype in DTYPES and DTYPES[dtype] != first.dtype:
        model.to(DTYPES[dtype])
    try:
        _check_shapes(model, weights)
        missing, unexpected = load_model(model, str(weights), strict=False)
    except SafetensorError as exc:
        raise UserError(f"{weights} is not a readable safetensors file ({exc}); re-export it") from None
    if missing or unexpected:
        raise UserError(f"{weights} does not fit the rebuilt model: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")


def _check_shapes(model: torch.nn.Module, weights: Path) -> None:
    """UserError naming the first parameter whose stored shape differs from the one config.json builds."""
    expected = model.state_dict()
    with safe_open(str(weights), framework="pt") as stored:
        for name in stored.keys():
            if name in expected:
                shape = list(stored.get_slice(name).get_shape())
                if shape != list(expected[name].shape):
                    raise UserError(f"{weights}: parameter {name} has shape {shape} in the file, but "
                                    f"{CONFIG_FILE} builds {list(expected[name].shape)}")
