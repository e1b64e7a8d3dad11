"""What an export directory is: its file names, the `linearize` section of its config.json, and the rule
that no file holds a local path of the machine that wrote it (`without_local_paths`). Writing it is
`export_writer.py`, loading it `export_loader.py`; `exported.py` names the promises."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
RUN_CONFIG_FILE = "linearize_run.json"
ADAPTER_DIR = "adapter"
SECTION = "linearize"
BUNDLE_KEY = "bundle"  # section key: {bundled code file name: sha256 hex}
VERSION_KEY = "transformers_version"  # section key: the transformers version the export was written with
# Keys that transformers and peft fill with where a model was loaded from; a local folder there is dropped
# to its name.
LOADED_FROM_KEYS = ("_name_or_path", "name_or_path", "base_model_name_or_path")


def read_config(path: Path) -> Optional[dict]:
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
    data = read_config(path)
    return data is not None and SECTION in data


def layer_mechanisms(section: dict) -> dict[int, str]:
    return {int(idx): mechanism for idx, mechanism in section["layers"].items()}


def is_local_path(value: str) -> bool:
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
    if isinstance(value, str) and is_local_path(value):
        return Path(value).expanduser().name
    return value


def loaded_from_dropped(data: dict) -> dict:
    """`data` with the where-it-was-loaded-from keys reduced to a folder name when they hold a local path."""
    return {key: (Path(value).expanduser().name if key in LOADED_FROM_KEYS and isinstance(value, str)
                  and is_local_path(value) else value) for key, value in data.items()}
