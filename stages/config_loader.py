"""Run configs: yaml files (with one level of `includes`) and `key=value` overrides, merged onto the
typed defaults of `linearize.config.RunConfig`, validated, then frozen.

Order of precedence (later wins): schema defaults → each included file, in order → the file itself →
command-line overrides. Every mistake (unknown key, wrong type, missing value, unknown name, value out
of range) raises `linearize.UserError` with one line naming the dotted key and where it was set (a file
path, or "command line"). The library never reads yaml: only `stages/` calls this module.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from linearize import UserError
from linearize.config import RunConfig, config_to_dict
from stages.registry import STAGES

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
INCLUDES_KEY = "includes"
COMMAND_LINE = "command line"
DEFAULTS = "defaults"



def _stage_names() -> tuple[str, ...]:
    return tuple(STAGES)


def _mechanisms() -> tuple[str, ...]:
    from linearize.attention import MECHANISMS

    return tuple(MECHANISMS)


def _attention_names(module: str, attr: str) -> Callable[[], tuple[str, ...]]:
    def names() -> tuple[str, ...]:
        import importlib

        return tuple(getattr(importlib.import_module(f"linearize.attention.{module}"), attr))

    return names


def _feature_maps() -> tuple[str, ...]:
    from linearize.feature_maps import available_feature_maps

    return tuple(available_feature_maps())


def _ops_names(attr: str) -> Callable[[], tuple]:
    def names() -> tuple:
        from linearize.ops import _common

        return tuple(getattr(_common, attr))

    return names


def _dtypes() -> tuple[str, ...]:
    from linearize.dtypes import DTYPES

    return tuple(DTYPES)


def _schedulers() -> tuple[str, ...]:
    from linearize.train.schedule import SCHEDULES

    return tuple(SCHEDULES)


def _autocast() -> tuple[str, ...]:
    from linearize.train.engine import AUTOCAST_DTYPES

    return tuple(AUTOCAST_DTYPES)


def _engines() -> tuple[str, ...]:
    from linearize.train.engine import ENGINES

    return tuple(ENGINES)


def _layer_choice(attr: str) -> Callable[[], Any]:
    def value() -> Any:
        from linearize.train import layer_choice

        return getattr(layer_choice, attr)

    return value


def _distributed(attr: str) -> Callable[[], tuple]:
    def names() -> tuple:
        from linearize.train import distributed

        return tuple(getattr(distributed, attr))

    return names


# Keys whose value must be one of a set of names. Each set is read from the registry that owns it (imported
# lazily: they pull in torch), so a value the loader accepts is one the library knows.
TRAIN_SECTIONS = ("attention_transfer", "lora_recovery")
CHOICES: dict[str, Callable[[], Iterable[Any]]] = {
    "model.dtype": _dtypes,
    "attention.mechanism": _mechanisms,
    "attention.feature_map": _feature_maps,
    "attention.init": _attention_names("calibrate", "INITS"),
    "attention.decay_from": _attention_names("gated_delta", "DECAY_SOURCES"),
    "attention_transfer.cache_dtype": lambda: _dtypes() + (None,),
    "attention.form": _ops_names("FORM_NAMES"),
    "attention.backend": _ops_names("BACKENDS"),
    "attention.softmax_layer_selector": lambda: tuple(_layer_choice("SELECTORS")()),
    **{f"{section}.scheduler": _schedulers for section in TRAIN_SECTIONS},
    **{f"{section}.autocast": _autocast for section in TRAIN_SECTIONS},
    "export.dtype": lambda: _dtypes() + (None,),
    "engine.name": _engines,
    "engine.precision": _distributed("PRECISIONS"),
    "engine.zero_stage": _distributed("ZERO_STAGES"),
}
# Keys holding lists whose every item must be one of a set of names.
LIST_CHOICES: dict[str, Callable[[], Iterable[Any]]] = {"stages": _stage_names}

POSITIVE = (
    "data.seq_len", "data.max_eval_sequences", "attention.feature_dim", "attention.window_size",
    "attention.chunk_size", "attention.gate_rank", "attention.gate_norm", "attention.conv_kernel",
    "attention.calibration_tokens",
    "lora_recovery.rank", "evaluate.max_sequences",
    *(f"{s}.{k}" for s in TRAIN_SECTIONS for k in ("micro_batch_size", "grad_accum", "save_every", "eval_every", "keep_last")),
)
NON_NEGATIVE = (
    "evaluate.sample_tokens", "attention.sink_tokens", "attention.liger_alpha", "attention.liger_beta", "lora_recovery.dropout",
    "attention.softmax_layer_count", "attention.selection_steps",
    "lora_recovery.kl_weight", "lora_recovery.ce_weight", "attention_transfer.mse_factor", "attention_transfer.attn_ce_weight",
    "attention_transfer.block_size", "attention_transfer.cache_gb",
    *(f"{s}.{k}" for s in TRAIN_SECTIONS for k in ("max_steps", "lr", "weight_decay", "warmup_steps", "min_lr", "grad_clip",
                                                    "eval_sequences", "plateau_patience", "plateau_factor")),
)
# Half-open [0, 1): a fraction of the data that must leave something to train on.
FRACTIONS = ("data.eval_fraction",)
# run_name becomes one folder under output_dir: a single path component, so a run can never reach (and
# later delete stale stages in) a folder outside output_dir.
RUN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# `${resolver:...}` calls a function while resolving (oc.env reads the environment, oc.create builds
# nodes); plain `${key}` references to other keys stay allowed.
RESOLVER_CALL = re.compile(r"\$\{\s*[\w.]+\s*:")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(source: str, key: str, problem: str) -> UserError:
    return UserError(f"{source}: {key}: {problem}")


# ---------------------------------------------------------------------------------------------- reading


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path}: invalid yaml{where}: {_one_line(getattr(exc, 'problem', exc))}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    return data


def _find_include(name: str, including: Path) -> Path:
    """An include path is relative to the including file, else to the repository's configs/."""
    for base in (including.parent, CONFIGS_DIR):
        candidate = base / name
        if candidate.is_file():
            return candidate
    raise UserError(f"{including}: {INCLUDES_KEY}: file not found: {name} (looked in {including.parent} and {CONFIGS_DIR})")


def _config_sources(path: Path) -> list[tuple[str, dict]]:
    """(source name, mapping) pairs in merge order: the includes of `path`, then `path` itself."""
    data = _read_yaml(path)
    includes = data.pop(INCLUDES_KEY, None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise _error(str(path), INCLUDES_KEY, "must be a list of yaml paths")
    sources = []
    for name in includes:
        included = _find_include(name, path)
        fragment = _read_yaml(included)
        if INCLUDES_KEY in fragment:
            raise _error(str(included), INCLUDES_KEY, f"only one level of includes is allowed (included from {path})")
        sources.append((str(included), fragment))
    sources.append((str(path), data))
    return sources


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


# ---------------------------------------------------------------------------------------------- merging


def _first_line(exc: OmegaConfBaseException) -> str:
    msg = getattr(exc, "msg", None) or str(exc)
    return _one_line(msg.splitlines()[0]) if msg else type(exc).__name__


def _check_keys(node: DictConfig, data: Mapping, source: str, prefix: str = "") -> None:
    """Unknown keys and scalars given for whole sections, with the valid keys listed."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in node:
            valid = [str(k) for k in node.keys()]
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise _error(source, dotted, f"unknown key{hint}; valid keys at {where}: {', '.join(valid)}")
        child = node.get(key)
        if isinstance(child, DictConfig):
            if not isinstance(value, Mapping):
                raise _error(source, dotted, f"is a section: expected a mapping of keys, got {value!r}")
            _check_keys(child, value, source, f"{dotted}.")


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
        raise _error(source, key, f"{data!r} calls a resolver; config values cannot read environment "
                                  "variables or run resolvers: write the value itself")


def _merge(cfg: DictConfig, data: Mapping, source: str, provenance: dict[str, str]) -> DictConfig:
    _check_no_resolvers(data, source)
    _check_keys(cfg, data, source)
    try:
        merged = OmegaConf.merge(cfg, data)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        problem = _first_line(exc)
        if ("None" in problem and "Incompatible" in problem) or problem.startswith("Value '' "):
            problem = "missing value"
        raise _error(source, key, problem) from None
    for key in _dotted_keys(data):
        provenance[key] = source
    return merged


def _where(key: str, provenance: Mapping[str, str]) -> str:
    return provenance.get(key) or provenance.get(key.split(".")[0], DEFAULTS)


# ---------------------------------------------------------------------------------------------- checks


def _choice_problems(cfg: DictConfig) -> Iterable[tuple[str, str]]:
    for key, names in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        valid = tuple(names())
        if value not in valid:
            shown = ", ".join("null" if v is None else str(v) for v in valid)
            yield key, f"unknown value {value!r}; valid: {shown}"
    for key, names in LIST_CHOICES.items():
        valid = tuple(names())
        for item in OmegaConf.select(cfg, key):
            if item not in valid:
                yield key, f"unknown name {item!r}; valid: {', '.join(map(str, valid))}"


def _range_problems(cfg: DictConfig) -> Iterable[tuple[str, str]]:
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            yield key, f"must be > 0, got {OmegaConf.select(cfg, key)}"
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            yield key, f"must be >= 0, got {OmegaConf.select(cfg, key)}"
    for key in FRACTIONS:
        if not 0.0 <= OmegaConf.select(cfg, key) < 1.0:
            yield key, f"must be in [0, 1), got {OmegaConf.select(cfg, key)}"


def _consistency_problems(cfg: DictConfig) -> Iterable[tuple[str, str]]:
    if not RUN_NAME.match(cfg.run_name) or cfg.run_name in (".", ".."):
        yield "run_name", (f"{cfg.run_name!r} is not a folder name: use letters, digits, '.', '_' and '-' "
                           "(one path component, not '.' or '..')")
    # Attention weights [B, H, T, T] exist only in the quadratic form.
    if cfg.attention_transfer.attn_ce_weight > 0 and cfg.attention.form != "parallel":
        yield "attention_transfer.attn_ce_weight", "> 0 needs attention.form=parallel (attention weights)"
    if cfg.lora_recovery.ce_weight <= 0 and cfg.lora_recovery.kl_weight <= 0:
        yield "lora_recovery.ce_weight", "is 0 and so is lora_recovery.kl_weight: LoRA would have no loss to train on"
    if len(set(cfg.stages)) != len(cfg.stages):
        yield "stages", f"lists a stage twice: {list(cfg.stages)}"
    layers = cfg.attention.layers
    if layers is not None and any(i < 0 for i in layers):
        yield "attention.layers", f"layer indices must be >= 0, got {list(layers)}"
    yield from _softmax_layer_problems(cfg)


def _softmax_layer_problems(cfg: DictConfig) -> Iterable[tuple[str, str]]:
    """attention.softmax_layers: a list of layer indices, or auto with a layer count (see
    linearize.train.layer_choice); a run's choice is not yet made block by block."""
    auto = _layer_choice("AUTO")()
    layers, count = cfg.attention.softmax_layers, cfg.attention.softmax_layer_count
    if isinstance(layers, ListConfig):
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            yield "attention.softmax_layers", f"layer indices must be integers >= 0, got {list(layers)}"
    elif layers != auto:
        yield "attention.softmax_layers", f"must be a list of layer indices or {auto!r}, got {layers!r}"
    elif count <= 0:
        yield "attention.softmax_layers", f"{auto} needs attention.softmax_layer_count > 0 (N layers, or a fraction < 1)"
    elif count >= 1 and count != int(count):
        yield "attention.softmax_layer_count", f"a count of layers (>= 1) must be a whole number, got {count}"
    elif cfg.attention_transfer.block_size > 0:
        yield "attention.softmax_layers", (f"{auto} is not available with block-wise transfer "
                                           "(attention_transfer.block_size > 0) yet: list the layers")


CHECKS = (_choice_problems, _range_problems, _consistency_problems)


def validate_config(cfg: DictConfig, provenance: Mapping[str, str] | None = None) -> None:
    """Raises UserError for the first bad value (names, ranges, cross-key rules)."""
    provenance = provenance or {}
    for check in CHECKS:
        for key, problem in check(cfg):
            raise _error(_where(key, provenance), key, problem)


# ---------------------------------------------------------------------------------------------- public


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
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise _error(_where(key, provenance) if key != "?" else source, key, _first_line(exc)) from None
    validate_config(cfg, provenance)
    # The library receives plain frozen dataclasses: it never sees (or imports) omegaconf.
    return OmegaConf.to_object(cfg)


def ignored_attention_keys(cfg: RunConfig, keys: Iterable[str]) -> list[str]:
    """One warning line for each dotted `attention.*` key in `keys` that cfg's mechanism does not read,
    naming the mechanisms that do (each mechanism declares its keys: `mechanism_config_keys`)."""
    from linearize.attention import mechanism_config_keys

    reads = mechanism_config_keys()
    mechanism = cfg.attention.mechanism
    warnings = []
    for dotted in keys:
        section, _, key = dotted.partition(".")
        if section != "attention" or key in reads[mechanism]:
            continue
        users = [name for name, used in reads.items() if key in used]
        warnings.append(f"{dotted} is ignored by attention.mechanism={mechanism}; it applies to: {', '.join(users)}")
    return warnings


def _switched_feature_map(cfg: DictConfig, parsed: Mapping) -> dict:
    """When the command line switches attention.mechanism without naming a feature map, and the new
    mechanism takes only some maps, its default map replaces the one the files chose for another
    mechanism (e.g. demo's hedgehog under `attention.mechanism=liger`). Returns the override to merge."""
    attention = parsed.get("attention") or {}
    if "mechanism" not in attention or "feature_map" in attention:
        return {}
    from linearize.attention import MECHANISMS

    factory = MECHANISMS.get(attention["mechanism"])
    default = getattr(factory, "default_feature_map", None)
    if default is None or cfg.attention.feature_map == default:
        return {}
    print(f"linearize: note: attention.feature_map={default}, {attention['mechanism']}'s default, replaces "
          f"{cfg.attention.feature_map} (set attention.feature_map to choose another)", file=sys.stderr)
    return {"attention": {"feature_map": default}}


def _with_overrides(cfg: DictConfig, overrides: Iterable[str], provenance: dict[str, str], source: str) -> RunConfig:
    """Applies command-line overrides, finishes the config, and warns (stderr, one line each) about
    attention keys set there that the chosen mechanism ignores."""
    parsed = parse_overrides(overrides)
    cfg = _merge(cfg, parsed, COMMAND_LINE, provenance)
    switched = _switched_feature_map(cfg, parsed)
    if switched:
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
    for source, data in _config_sources(path):
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
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path
