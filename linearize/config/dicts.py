"""Configs as plain data: the one dict conversion and the one key diff every layer uses (run snapshots,
checkpoint and DONE comparisons, the loader's round trips)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

_ABSENT = "<absent>"


def config_to_dict(cfg: Any) -> dict:
    """A JSON-able nested dict of a config dataclass (or a mapping of plain values)."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(data))  # lists for tuples, str keys: what a JSON snapshot reads back as


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; non-mapping values are leaves."""
    if not isinstance(data, Mapping):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_keys(saved: Any, current: Any, defaults: Any = None) -> list[str]:
    """Sorted dotted keys whose values differ between two configs (dataclasses or dicts); a key present
    in only one of them counts. With `defaults` (a config of the current schema's defaults), a key the
    saved config lacks reads as its default: a snapshot written before the key existed ran with the
    behaviour its default keeps, so upgrading linearize does not refuse to resume an unchanged run."""
    old, new = flatten(config_to_dict(saved)), flatten(config_to_dict(current))
    if defaults is not None:
        old = {**flatten(config_to_dict(defaults)), **old}
    return sorted(key for key in old.keys() | new.keys() if old.get(key, _ABSENT) != new.get(key, _ABSENT))
