"""Run configs: yaml files (with one level of `includes`, read by `stages/config_files.py`) and
`key=value` overrides, merged onto the typed defaults of `linearize.config.RunConfig`, checked
(`linearize.config.validate`: the rules beside the schema's fields and across keys), then frozen.

Order of precedence (later wins): schema defaults → each included file, in order → the file itself →
command-line overrides. Every mistake (unknown key, wrong type, missing value, unknown name, value out
of range, a combination the mechanism cannot run) raises `linearize.UserError` with one line naming the
dotted key and where it was set (a file path, or "command line"). The library never reads yaml: only
`stages/` calls this module, the one importer of omegaconf.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from linearize import UserError
from linearize.files import write_text
from linearize.config import RunConfig, config_to_dict
from linearize.config.validate import validate
from linearize.errors import one_line

from .config_files import CONFIGS_DIR, INCLUDES_KEY, config_sources, error
from .config_hints import ignored_attention_keys, switched_feature_map

__all__ = ["CONFIGS_DIR", "config_from_dict", "config_to_dict", "ignored_attention_keys", "load_config",
           "parse_overrides", "save_resolved"]

COMMAND_LINE = "command line"
DEFAULTS = "defaults"
# `${resolver:...}` calls a function while resolving (oc.env reads the environment, oc.create builds
# nodes); plain `${key}` references to other keys stay allowed.
RESOLVER_CALL = re.compile(r"\$\{\s*[\w.]+\s*:")


def parse_overrides(overrides: Iterable[str]) -> dict:
    """`["data.seq_len=256", "stages=[evaluate]"]` → nested dict; values are parsed as yaml, and an empty
    value is the empty string."""
    merged = OmegaConf.create()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{COMMAND_LINE}: override '{item}' is not of the form key=value")
        if key.startswith(INCLUDES_KEY):
            raise UserError(f"{COMMAND_LINE}: '{INCLUDES_KEY}' can only be set in a yaml file")
        try:
            # `key=` means the empty string (e.g. `data.eval=` to hold out eval data); `key=null` is None.
            parsed = OmegaConf.from_dotlist([item]) if value else OmegaConf.from_dotlist([f"{key}=''"])
            merged = OmegaConf.merge(merged, parsed)
        except OmegaConfBaseException as exc:
            raise UserError(f"{COMMAND_LINE}: cannot parse override '{item}': {_first_line(exc)}") from None
    return OmegaConf.to_container(merged)


def _first_line(exc: OmegaConfBaseException) -> str:
    msg = getattr(exc, "msg", None) or str(exc)
    return one_line(msg.splitlines()[0]) if msg else type(exc).__name__


def _problem(exc: OmegaConfBaseException) -> str:
    """OmegaConf's message, with its several ways of saying a value is absent as one."""
    problem = _first_line(exc)
    absent = (("None" in problem and "Incompatible" in problem) or problem.startswith("Value '' ")
              or "missing mandatory value" in problem.lower())
    return "missing value" if absent else problem


def _unknown_key(source: str, dotted: str, key: str, valid: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return error(source, dotted, f"unknown key{hint}; valid keys at {where}: {', '.join(valid)}")


def _entry_type(node: DictConfig, key: str) -> type | None:
    """The dataclass of each item when schema field `key` of `node` is a list of dataclasses (data.mix)."""
    hint = typing.get_type_hints(OmegaConf.get_type(node)).get(key)
    while hint is not None and not dataclasses.is_dataclass(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if args else None
    return hint


def _check_keys(node: DictConfig, data: Mapping, source: str, prefix: str = "") -> None:
    """Unknown keys (in sections and in list entries of a dataclass type) and scalars given for whole
    sections, with the valid keys listed."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in node:
            where = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise _unknown_key(source, dotted, key, [str(k) for k in node.keys()], where)
        child = node.get(key)
        if isinstance(child, DictConfig):
            if not isinstance(value, Mapping):
                raise error(source, dotted, f"is a section: expected a mapping of keys, got {value!r}")
            _check_keys(child, value, source, f"{dotted}.")
        elif isinstance(value, list) and (entry := _entry_type(node, key)) is not None:
            valid = [f.name for f in dataclasses.fields(entry)]
            for i, item in enumerate(value):
                for item_key in item if isinstance(item, Mapping) else ():
                    if item_key not in valid:
                        raise _unknown_key(source, f"{dotted}[{i}].{item_key}", item_key, valid, f"'{dotted}[{i}]'")


def _dotted_keys(data: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            keys.extend(_dotted_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _check_no_resolvers(data: Any, source: str, key: str = "") -> None:
    """Refuses values that call an OmegaConf resolver: a config must not read environment variables
    (or anything else outside itself) when it is resolved."""
    if isinstance(data, Mapping):
        for child, value in data.items():
            _check_no_resolvers(value, source, f"{key}.{child}" if key else str(child))
    elif isinstance(data, (list, tuple)):
        for value in data:
            _check_no_resolvers(value, source, key)
    elif isinstance(data, str) and RESOLVER_CALL.search(data):
        raise error(source, key, f"{data!r} calls a resolver; config values cannot read environment "
                                 "variables or run resolvers: write the value itself")


def _merge(cfg: DictConfig, data: Mapping, source: str, provenance: dict[str, str]) -> DictConfig:
    _check_no_resolvers(data, source)
    _check_keys(cfg, data, source)
    try:
        merged = OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as exc:
        raise error(source, getattr(exc, "full_key", None) or "?", _problem(exc)) from None
    for key in _dotted_keys(data):
        provenance[key] = source
    return merged


def _where(key: str, provenance: Mapping[str, str]) -> str:
    """Where `key` (e.g. `data.mix[0].weight`) was set: its own entry, else the nearest enclosing key's."""
    parts = key.split("[")[0].split(".")
    for end in range(len(parts), 0, -1):
        source = provenance.get(".".join(parts[:end]))
        if source:
            return source
    return DEFAULTS


def _make_writable(node: DictConfig) -> None:
    """The schema's frozen dataclasses mark every section read-only, but resolving writes each
    interpolation's value in place (the result is frozen again as dataclasses by `_finish`)."""
    OmegaConf.set_readonly(node, False)
    for key in node.keys():
        child = None if OmegaConf.is_missing(node, key) else node[key]
        if isinstance(child, DictConfig):
            _make_writable(child)
        elif isinstance(child, ListConfig):
            OmegaConf.set_readonly(child, False)


def _finish(cfg: DictConfig, provenance: Mapping[str, str], source: str) -> RunConfig:
    try:
        _make_writable(cfg)
        OmegaConf.resolve(cfg)
        # The library receives plain frozen dataclasses: it never sees (or imports) omegaconf.
        run_config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise error(_where(key, provenance) if key != "?" else source, key, _problem(exc)) from None
    for key, problem in validate(run_config):
        raise error(_where(key, provenance), key, problem)
    return run_config


def _with_overrides(cfg: DictConfig, overrides: Iterable[str], provenance: dict[str, str], source: str) -> RunConfig:
    """Applies command-line overrides, finishes the config, and warns (stderr, one line each) about
    attention keys set there that the chosen mechanism ignores."""
    parsed = parse_overrides(overrides)
    cfg = _merge(cfg, parsed, COMMAND_LINE, provenance)
    switched, note = switched_feature_map(cfg.attention.feature_map, parsed)
    if switched:
        print(f"linearize: note: {note}", file=sys.stderr)
        cfg = _merge(cfg, switched, f"the default of attention.mechanism={cfg.attention.mechanism}", provenance)
    run_config = _finish(cfg, provenance, source)
    for line in ignored_attention_keys(run_config, _dotted_keys(parsed)):
        print(f"linearize: warning: {line}", file=sys.stderr)
    return run_config


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> RunConfig:
    """The frozen run config of yaml file `path` (and its includes) with `key=value` overrides applied."""
    path = Path(path)
    cfg = OmegaConf.structured(RunConfig)
    provenance: dict[str, str] = {}
    for source, data in config_sources(path):
        cfg = _merge(cfg, data, source, provenance)
    return _with_overrides(cfg, overrides, provenance, str(path))


def config_from_dict(data: Mapping, source: str = "config", overrides: Iterable[str] = ()) -> RunConfig:
    """The frozen run config of a plain mapping (e.g. the resolved config stored in a checkpoint)."""
    provenance: dict[str, str] = {}
    cfg = _merge(OmegaConf.structured(RunConfig), dict(data), source, provenance)
    return _with_overrides(cfg, overrides, provenance, source)


def save_resolved(cfg: RunConfig, path: str | os.PathLike) -> Path:
    """Writes the resolved config as yaml (atomically: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
