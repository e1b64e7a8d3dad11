"""The exported student: a Hugging Face directory (config.json, model.safetensors, tokenizer,
generation config) whose config.json carries a `linearize` section — the attention config and each
converted layer's mechanism — so `load_export` rebuilds it from the base architecture alone, without
the training run's files. An unmerged LoRA adapter, if any, sits in `adapter/` and is merged on load.

config.json names the model type `linearize_<base>` and maps the Auto classes (`auto_map`) to the
bundled `modeling_linearize.py` (see `bundle.py`), so plain transformers loads the directory with
`trust_remote_code=True` even where linearize is not installed; after
`linearize.models.register_auto_classes()` (which `load_export` calls) the Auto classes load it without
remote code.

What an export promises (docs/guarantees.md):
- the section records the sha256 of every bundled code file and the transformers version it was
  written with; `load_export` refuses code files that differ, are missing or are not recorded, and
  warns once when the installed transformers is outside the range linearize declares;
- no file holds an absolute path of the machine that wrote it;
- writing is all or nothing: a failed export leaves no temporary folder and an existing export intact.
"""
from __future__ import annotations

import ctypes
import errno
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

import linearize
from .. import adapters
from ..config.schema import AttentionConfig
from ..dtypes import DTYPES, torch_dtype
from ..files import sha256_file
from ..errors import UserError
from . import bundle, hf

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RUN_CONFIG_FILE = "linearize_run.json"
ADAPTER_DIR = "adapter"
SECTION = "linearize"
BUNDLE_KEY = "bundle"  # section key: {bundled code file name: sha256 hex}
VERSION_KEY = "transformers_version"  # section key: the transformers version the export was written with
# Layers that stay softmax use the fastest exact implementation, as the teacher loader does.
ATTN_IMPLEMENTATION = "sdpa"
# safetensors writes owner-only files (and mkdtemp owner-only folders); an export is meant to be shared
# like any model directory.
SHARED_FILE_MODE = 0o644
SHARED_DIR_MODE = 0o755
# Write faults that are the machine's, not linearize's: reported as one line naming the export path.
WRITE_FAULTS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
# renameat2 arguments (linux/fcntl.h, linux/fs.h): paths relative to the working directory; swap both.
AT_FDCWD, RENAME_EXCHANGE = -100, 2
# Keys that transformers and peft fill with where a model was loaded from; a local folder there is dropped
# to its name.
LOADED_FROM_KEYS = ("_name_or_path", "name_or_path", "base_model_name_or_path")
_warned_versions: set[str] = set()  # installed transformers versions already warned about in this process


def _read_config(path: Path) -> Optional[dict]:
    """The parsed config.json of `path` (None when there is none); UserError when it is not a JSON object."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{config} is not valid JSON ({exc}): restore it or re-export") from None
    if not isinstance(data, dict):
        raise UserError(f"{config} is not a JSON object: restore it or re-export")
    return data


def is_export_dir(path: Path) -> bool:
    """Whether `path` holds a config.json with a `linearize` section; UserError if config.json is malformed."""
    data = _read_config(path)
    return data is not None and SECTION in data


def _layers(section: dict) -> dict[int, str]:
    return {int(idx): mechanism for idx, mechanism in section["layers"].items()}


# ------------------------------------------------------------------------------------------------ writing


def save_export(model: torch.nn.Module, tokenizer, out_dir: Path, *, dtype: Optional[str] = None,
                run_config: Optional[dict] = None, adapter_dir: Optional[Path] = None,
                overwrite: bool = False) -> Path:
    """Writes a converted (LoRA-merged, unwrapped) model as a self-describing directory, atomically.

    dtype: cast the weights (float32 | bfloat16 | float16; None keeps them). run_config: the resolved
    run config, stored (without local paths) so `linearize eval` on the export knows its settings.
    adapter_dir: an unmerged LoRA adapter to ship beside the weights. An existing `out_dir` is replaced
    if it is an export or empty; anything else only with overwrite=True. On any failure `out_dir` is
    untouched and no temporary folder remains; write faults (disk full, permissions) are UserErrors."""
    if not getattr(model.config, SECTION, None):
        raise ValueError("the model has no config.linearize section: was it converted with linearize_model?")
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    tmp = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
        tmp.chmod(SHARED_DIR_MODE)
        _write(model, tokenizer, tmp, dtype, run_config, adapter_dir)
        _publish(tmp, out_dir)
    except OSError as exc:
        if exc.errno not in WRITE_FAULTS:
            raise
        raise UserError(f"cannot write the export to {out_dir}: {WRITE_FAULTS[exc.errno]} "
                        f"({exc.strerror}); nothing there was changed") from None
    finally:
        if tmp is not None:  # after a swap it holds the previous export
            _remove(tmp)
    return out_dir


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuses to replace a non-empty folder (or a file) that is not a linearize export, unless overwrite."""
    if overwrite or not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not out_dir.is_dir():
        raise UserError(f"export path {out_dir} exists and is not a folder: choose another path, or overwrite it")
    try:
        ours = is_export_dir(out_dir)
    except UserError:  # a malformed config.json: not recognisably ours
        ours = False
    if not ours and any(out_dir.iterdir()):
        raise UserError(f"export path {out_dir} is not empty and is not a linearize export: choose another "
                        "path, or overwrite it")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Puts `tmp` at `out_dir`. An existing `out_dir` is swapped with `tmp` in one step where the system
    can (`_exchange`), so there is no moment without an export there, and ends up in `tmp`; elsewhere it
    is renamed aside, `tmp` renamed in, and only then deleted (a failure in between puts it back)."""
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.rename(tmp, out_dir)
        return
    if _exchange(tmp, out_dir):
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    old.rmdir()  # only the unique name is wanted: rename refuses to move a folder onto a non-empty one
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two existing paths with Linux's renameat2(RENAME_EXCHANGE); False where the
    system (kernel, C library or file system) cannot, and nothing was changed."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no exchange here: use the fallback
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove(path: Path) -> None:
    """Deletes a folder tree, or a file or symlink (never following it)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write(model, tokenizer, out: Path, dtype: Optional[str], run_config: Optional[dict],
           adapter_dir: Optional[Path]) -> None:
    if dtype is not None:
        model.to(torch_dtype(dtype))
        model.config.dtype = dtype
    # save_model drops duplicate storage (tied embeddings) and load_model re-ties it.
    save_model(model, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    os.chmod(out / WEIGHTS_FILE, SHARED_FILE_MODE)
    model.config.save_pretrained(out)
    code_files = bundle.write_bundle(out)
    _finish_config(out / CONFIG_FILE, {name: sha256_file(out / name) for name in code_files})
    model.generation_config.save_pretrained(out)
    _drop_loaded_from(out / "generation_config.json")
    tokenizer.save_pretrained(out)
    _drop_loaded_from(out / "tokenizer_config.json")
    if run_config is not None:
        (out / RUN_CONFIG_FILE).write_text(json.dumps(without_local_paths(run_config), indent=2))
    if adapter_dir is not None:
        _copy_adapter(Path(adapter_dir), out / ADAPTER_DIR)


def _finish_config(config_file: Path, code_hashes: dict[str, str]) -> None:
    """Rewrites the saved config as the `linearize_<base>` model type, with `auto_map` pointing the
    Auto classes at the bundled modeling file, and records the bundle's hashes and the transformers
    version in the section."""
    import transformers

    config = json.loads(config_file.read_text())
    base = config["model_type"].removeprefix(hf.MODEL_TYPE_PREFIX)  # re-exporting a loaded export
    config_class, model_class = hf.classes_for(base)
    module = bundle.MODELING_MODULE
    config.update(
        model_type=config_class.model_type,
        architectures=[model_class.__name__],
        auto_map={"AutoConfig": f"{module}.{config_class.__name__}",
                  "AutoModelForCausalLM": f"{module}.{model_class.__name__}"},
    )
    config[SECTION] = {**config[SECTION], BUNDLE_KEY: code_hashes, VERSION_KEY: transformers.__version__}
    config_file.write_text(json.dumps(_loaded_from_dropped(config), indent=2, sort_keys=True) + "\n")


def _is_local_path(value: str) -> bool:
    """An absolute path (or `~/...`) with at least one component below the root: a path of this machine."""
    path = Path(value).expanduser()
    return "\n" not in value and path.is_absolute() and len(path.parts) > 1


def without_local_paths(value: Any) -> Any:
    """A copy of a nested dict/list config in which every absolute local path is replaced by its last
    component (`/home/u/data/news.txt` → `news.txt`): what the run used stays readable, where it lay on
    the writing machine does not leak."""
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and _is_local_path(value):
        return Path(value).expanduser().name
    return value


def _loaded_from_dropped(data: dict) -> dict:
    """`data` with the where-it-was-loaded-from keys reduced to a folder name when they hold a local path."""
    return {key: (Path(value).expanduser().name if key in LOADED_FROM_KEYS and isinstance(value, str)
                  and _is_local_path(value) else value) for key, value in data.items()}


def _drop_loaded_from(json_file: Path) -> None:
    if json_file.is_file():
        data = json.loads(json_file.read_text())
        if isinstance(data, dict) and data != _loaded_from_dropped(data):
            json_file.write_text(json.dumps(_loaded_from_dropped(data), indent=2, sort_keys=True) + "\n")


def _copy_adapter(src: Path, dest: Path) -> None:
    """Copies the LoRA adapter; peft records the base model's local folder in its config and model card,
    which become the folder's name."""
    shutil.copytree(src, dest)
    config_file = dest / "adapter_config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and _is_local_path(base):
        _drop_loaded_from(config_file)
        card = dest / "README.md"
        if card.is_file():
            card.write_text(card.read_text().replace(base, Path(base).expanduser().name))


# ------------------------------------------------------------------------------------------------ loading


def load_export(path: Path):
    """(model in eval mode, tokenizer) from an export directory: base architecture from config.json,
    `linearize_model` re-applied from the recorded section, then the saved weights (strict).

    Checks first, with a one-line UserError each: config.json and its section are well formed, and the
    bundled code files are exactly the recorded ones (sha256). Never runs code from the directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    data = _read_config(path)
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
    rebuilt = _layers(getattr(model.config, SECTION))
    if rebuilt != _layers(section):
        raise UserError(f"{path}: re-applying the recorded attention config gives layers {rebuilt}, "
                        f"but the export records {_layers(section)}")
    return model


def _model_type(path: Path) -> Any:
    """The `model_type` config.json names (None when it names none)."""
    return (_read_config(path) or {}).get("model_type")


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
