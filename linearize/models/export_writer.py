"""Writing an export directory all or nothing: into a temp folder beside the target, then swapped in
(`_publish`). Any write fault (disk full, read-only, permissions, size limit; any library's error type)
is one UserError line naming the export path, and the target is left as it was."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_model

from ..dtypes import torch_dtype
from ..errors import UserError, one_line
from ..files import atomic_path, fault_cause, sha256_file, write_json, write_text
from . import bundle, hf
from .export_format import (ADAPTER_DIR, CONFIG_FILE, RUN_CONFIG_FILE, SECTION, BUNDLE_KEY, VERSION_KEY, WEIGHTS_FILE,
                            is_export_dir, is_local_path, loaded_from_dropped, without_local_paths)

# safetensors writes owner-only files (and mkdtemp owner-only folders); an export is meant to be shared
# like any model directory.
SHARED_FILE_MODE = 0o644
SHARED_DIR_MODE = 0o755
# renameat2 arguments (linux/fcntl.h, linux/fs.h): paths relative to the working directory; swap both.
AT_FDCWD, RENAME_EXCHANGE = -100, 2


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
    except Exception as exc:  # any library's error type: a write fault is told by its cause, a bug re-raised
        cause = fault_cause(exc)
        if cause is None:
            raise
        raise UserError(f"cannot write the export to {out_dir}: {cause} ({one_line(exc)}); "
                        "nothing there was changed") from None
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
    with atomic_path(out / WEIGHTS_FILE) as weights:
        save_model(model, str(weights), metadata={"format": "pt"})
    os.chmod(out / WEIGHTS_FILE, SHARED_FILE_MODE)
    model.config.save_pretrained(out)
    code_files = bundle.write_bundle(out)
    _finish_config(out / CONFIG_FILE, {name: sha256_file(out / name) for name in code_files})
    model.generation_config.save_pretrained(out)
    _drop_loaded_from(out / "generation_config.json")
    tokenizer.save_pretrained(out)
    _drop_loaded_from(out / "tokenizer_config.json")
    if run_config is not None:
        write_json(out / RUN_CONFIG_FILE, without_local_paths(run_config))
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
    write_json(config_file, loaded_from_dropped(config), sort_keys=True)


def _drop_loaded_from(json_file: Path) -> None:
    if json_file.is_file():
        data = json.loads(json_file.read_text())
        if isinstance(data, dict) and data != loaded_from_dropped(data):
            write_json(json_file, loaded_from_dropped(data), sort_keys=True)


def _copy_adapter(src: Path, dest: Path) -> None:
    """Copies the LoRA adapter; peft records the base model's local folder in its config and model card,
    which become the folder's name."""
    shutil.copytree(src, dest)
    config_file = dest / "adapter_config.json"
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and is_local_path(base):
        _drop_loaded_from(config_file)
        card = dest / "README.md"
        if card.is_file():
            write_text(card, card.read_text().replace(base, Path(base).expanduser().name))

