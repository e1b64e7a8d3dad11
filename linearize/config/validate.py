"""Checks a typed `RunConfig` before anything loads: every field against the rules beside it in the schema
(`linearize.config.rules`), every float for nan/inf, then the rules across keys below, including what the
chosen mechanism's registry entry says it can do (`linearize.attention.Registered`).

`validate(cfg)` returns `[(dotted_key, problem)]` in a fixed order; the loader reports the first one.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

from .rules import Registry, field_rules, not_finite
from .schema import MECHANISMS, RunConfig

Problems = Iterator[tuple[str, str]]

# run_name becomes one folder under output_dir: a single path component, so a run can never reach (and
# later delete stale stages in) a folder outside output_dir.
RUN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# The attention.softmax_layers value that asks a run to choose the layers.
AUTO_LAYERS = Registry("linearize.train.layer_choice", "AUTO")


def validate(cfg: RunConfig) -> list[tuple[str, str]]:
    """Every problem of `cfg` as (dotted key, one-line problem), field rules first, then cross-key rules."""
    problems = list(field_problems(cfg))
    if not problems:  # the cross-key rules read values the field rules vouched for
        for check in CROSS_KEY_CHECKS:
            problems.extend(check(cfg))
    return problems


def field_problems(node: Any, prefix: str = "") -> Problems:
    """Each field of a config dataclass (recursively, through lists of dataclasses): not finite, or
    breaking a rule of its metadata."""
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from field_problems(value, f"{key}.")
            continue
        if isinstance(value, (list, tuple)) and any(dataclasses.is_dataclass(item) for item in value):
            for i, item in enumerate(value):
                yield from field_problems(item, f"{key}[{i}].")
            continue
        bad = next((item for item in (value if isinstance(value, (list, tuple)) else [value]) if not_finite(item)), None)
        if bad is not None:
            yield key, f"must be a finite number, got {bad}"
            continue
        for rule in field_rules(f.metadata):
            problem = rule.problem(value)
            if problem:
                yield key, problem
                break


# ---------------------------------------------------------------------------------------------- across keys


def _run_problems(cfg: RunConfig) -> Problems:
    if not RUN_NAME.match(cfg.run_name) or cfg.run_name in (".", ".."):
        yield "run_name", (f"{cfg.run_name!r} is not a folder name: use letters, digits, '.', '_' and '-' "
                           "(one path component, not '.' or '..')")
    if len(set(cfg.stages)) != len(cfg.stages):
        yield "stages", f"lists a stage twice: {list(cfg.stages)}"
    if cfg.lora_recovery.ce_weight <= 0 and cfg.lora_recovery.kl_weight <= 0:
        yield "lora_recovery.ce_weight", "is 0 and so is lora_recovery.kl_weight: LoRA would have no loss to train on"
    if not cfg.lora_recovery.targets and not cfg.lora_recovery.train_student:
        yield "lora_recovery.targets", ("is empty and lora_recovery.train_student is false: stage 2 would have nothing "
                                        "to train (name LoRA targets, or set train_student: true)")


def _mechanism_problems(cfg: RunConfig) -> Problems:
    """What the chosen mechanism's registry entry says it supports."""
    attention = cfg.attention
    registry = MECHANISMS.load()
    entry = registry[attention.mechanism]
    if attention.form not in entry.forms:
        yield "attention.form", (f"mechanism {attention.mechanism} has no {attention.form!r} form; "
                                 f"valid: {', '.join(entry.forms)}")
    if cfg.attention_transfer.attn_ce_weight > 0:
        givers = ", ".join(name for name, e in registry.items() if e.attention_weights)
        if not entry.attention_weights:
            yield "attention_transfer.attn_ce_weight", (f"> 0 needs attention weights, which mechanism "
                                                        f"{attention.mechanism} does not give (mechanisms that do: {givers})")
        elif attention.window_only:
            yield "attention_transfer.attn_ce_weight", ("> 0 needs a linear branch to train; attention.window_only="
                                                        "true has none")
        elif attention.form != "parallel":  # [B, H, T, T] weights exist only in the quadratic form
            yield "attention_transfer.attn_ce_weight", "> 0 needs attention.form=parallel (attention weights)"
    if attention.linear_half_life_learned and attention.linear_half_life is None:
        yield "attention.linear_half_life_learned", ("true needs attention.linear_half_life (the half-life every "
                                                     "head starts from)")
    yield from _native_family_problems(cfg, registry)


def _native_family_problems(cfg: RunConfig, registry: dict) -> Problems:
    family, mechanism = cfg.attention.native_family, cfg.attention.mechanism
    if family is None:
        return
    fixed = registry[mechanism].native_families.get(family)
    if fixed is None:
        able = [name for name, e in registry.items() if family in e.native_families]
        yield "attention.native_family", (f"{family} cannot be trained with mechanism {mechanism}; mechanisms "
                                          f"it takes: {', '.join(able) or 'none'}")
        return
    for key, value in fixed.items():
        if getattr(cfg.attention, key) != value:
            yield f"attention.{key}", (f"native_family={family} needs attention.{key}={_yaml(value)}, "
                                       f"got {_yaml(getattr(cfg.attention, key))}")


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _layer_problems(cfg: RunConfig) -> Problems:
    """attention.layers, and attention.softmax_layers: a list of layer indices, or auto with a layer count
    (see linearize.train.layer_choice); a run's choice is not yet made block by block."""
    layers = cfg.attention.layers
    if layers is not None and any(i < 0 for i in layers):
        yield "attention.layers", f"layer indices must be >= 0, got {list(layers)}"
    chosen, count, auto = cfg.attention.softmax_layers, cfg.attention.softmax_layer_count, AUTO_LAYERS.load()
    if isinstance(chosen, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in chosen):
            yield "attention.softmax_layers", f"layer indices must be integers >= 0, got {list(chosen)}"
    elif chosen != auto:
        yield "attention.softmax_layers", f"must be a list of layer indices or {auto!r}, got {chosen!r}"
    elif count <= 0:
        yield "attention.softmax_layers", f"{auto} needs attention.softmax_layer_count > 0 (N layers, or a fraction < 1)"
    elif count >= 1 and count != int(count):
        yield "attention.softmax_layer_count", f"a count of layers (>= 1) must be a whole number, got {count}"


def _data_problems(cfg: RunConfig) -> Problems:
    data = cfg.data
    if data.mix is not None and not data.mix:
        yield "data.mix", "is an empty list: give at least one {source, weight} entry, or null to use data.train"
    for i, entry in enumerate(data.mix or ()):
        if not entry.source.strip():
            yield f"data.mix[{i}].source", "is empty: name a corpus, a file, teacher or recall"
    context = list(data.teacher_samples.context_tokens)
    if len(context) != 2 or not 0 < context[0] <= context[1]:
        yield "data.teacher_samples.context_tokens", f"must be a pair [min, max] with 0 < min <= max, got {context}"
    recall = data.recall
    if recall.min_distance > recall.max_distance:
        yield "data.recall.min_distance", (f"must be <= data.recall.max_distance ({recall.max_distance}), "
                                           f"got {recall.min_distance}")


CROSS_KEY_CHECKS: tuple[Callable[[RunConfig], Problems], ...] = (
    _run_problems, _mechanism_problems, _layer_problems, _data_problems,
)
