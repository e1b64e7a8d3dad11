"""Model surgery: find the decoder layers of a supported architecture, wrap the selected attentions in
`LinearizedAttention`, undo it exactly, freeze everything but the student, and switch modes.

Decoder layers are found through one explicit table; any other architecture is refused."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..attention import LinearizedAttention, RunOptions, build_mechanism, mechanism_factory
from ..config import AttentionConfig
from ..errors import UserError
from ..ops._common import BACKENDS, FORM_NAMES


@dataclass(frozen=True)
class DecoderLayout:
    """Where a model family keeps its decoder layers and, in each, its attention module."""

    layers: str  # dotted path from the *ForCausalLM model
    attention: str


ARCHITECTURES: dict[str, DecoderLayout] = {
    "llama": DecoderLayout(layers="model.layers", attention="self_attn"),
    "mistral": DecoderLayout(layers="model.layers", attention="self_attn"),
    "qwen2": DecoderLayout(layers="model.layers", attention="self_attn"),
    "qwen3": DecoderLayout(layers="model.layers", attention="self_attn"),
}


def decoder_layers(model: nn.Module) -> tuple[list[nn.Module], DecoderLayout]:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    layout = ARCHITECTURES[model_type]
    return list(model.get_submodule(layout.layers)), layout


def as_attention_config(cfg: Any) -> AttentionConfig:
    """Accept the dataclass or a plain mapping of its keys (e.g. read back from an export)."""
    if isinstance(cfg, AttentionConfig):
        return cfg
    return AttentionConfig(**dict(cfg))


def selected_layers(cfg: AttentionConfig, num_layers: int) -> list[int]:
    """The layers to convert: `cfg.layers` (or all) minus `cfg.softmax_layers`; none for `softmax`."""
    if mechanism_factory(cfg.mechanism) is None:
        return []
    if isinstance(cfg.softmax_layers, str):  # "auto": a run resolves it into indices (stages/common.py)
        raise UserError(f"attention.softmax_layers={cfg.softmax_layers!r} is resolved by a run into layer indices; "
                        "converting a model needs the list itself")
    candidates = list(range(num_layers)) if cfg.layers is None else list(cfg.layers)
    for idx in [*candidates, *cfg.softmax_layers]:
        if not 0 <= idx < num_layers:
            raise UserError(f"attention layer index {idx} is out of range: the model has {num_layers} layers")
    keep = set(cfg.softmax_layers)
    return [i for i in candidates if i not in keep]


def check_run_options(cfg: AttentionConfig) -> None:
    """Refuse an unknown form or backend at conversion time rather than at the first forward."""
    for key, value, valid in (("form", cfg.form, FORM_NAMES), ("backend", cfg.backend, BACKENDS)):
        if value not in valid:
            raise UserError(f"unknown attention.{key} {value!r}; valid: {', '.join(valid)}")


def linearize_model(model: nn.Module, attention_config: Any) -> nn.Module:
    """Wrap the attention of every selected layer in place and record the conversion in
    `model.config.linearize`. New parameters are fp32 on the model's device."""
    cfg = as_attention_config(attention_config)
    check_run_options(cfg)
    layers, layout = decoder_layers(model)
    if any(isinstance(getattr(layer, layout.attention), LinearizedAttention) for layer in layers):
        raise UserError("this model is already linearized; call unlinearize_model first")
    text_cfg = model.config.get_text_config(decoder=True)
    opts = RunOptions(form=cfg.form, chunk_size=cfg.chunk_size, backend=cfg.backend, compile=cfg.compile)
    converted = selected_layers(cfg, len(layers))
    for idx in converted:
        base = getattr(layers[idx], layout.attention)
        device = next(base.parameters()).device
        mechanism = build_mechanism(
            cfg, text_cfg.num_attention_heads, text_cfg.num_key_value_heads, base.head_dim, text_cfg.hidden_size
        ).to(device=device, dtype=torch.float32)
        setattr(layers[idx], layout.attention, LinearizedAttention(base, mechanism, idx, opts))
    model.config.linearize = {
        "attention": dataclasses.asdict(cfg),
        "layers": {str(i): (cfg.mechanism if i in converted else "softmax") for i in range(len(layers))},
    }
    return model


def wrapped_attentions(model: nn.Module) -> Iterator[LinearizedAttention]:
    for module in model.modules():
        if isinstance(module, LinearizedAttention):
            yield module


def unlinearize_model(model: nn.Module) -> nn.Module:
    """Put every original attention module back (the same objects) and forget the conversion."""
    layers, layout = decoder_layers(model)
    for layer in layers:
        attn = getattr(layer, layout.attention)
        if isinstance(attn, LinearizedAttention):
            setattr(layer, layout.attention, attn.base_layer)
    if hasattr(model.config, "linearize"):
        del model.config.linearize
    return model


def student_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The student's new parameters by group: feature_maps, gates, mixing, conv (full model names)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"feature_maps": [], "gates": [], "mixing": [], "conv": []}
    prefixes = {id(m): name for name, m in model.named_modules()}
    for attn in wrapped_attentions(model):
        prefix = prefixes[id(attn.mechanism)]
        params = dict(attn.mechanism.named_parameters())
        for name, group in attn.mechanism.param_groups().items():
            groups[group].append((f"{prefix}.{name}", params[name]))
    return groups


def freeze_for_transfer(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything except the student's parameters; returns the trainable ones."""
    model.requires_grad_(False)
    trainable = [p for group in student_parameters(model).values() for _, p in group]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def set_recompute(model: nn.Module, recompute: bool) -> nn.Module:
    """Whether the converted layers recompute their mechanism in backward when the whole model trains
    through them (student mode with gradients, no cache: LoRA recovery): less memory for about one more
    mechanism forward per step. On by default."""
    for attn in wrapped_attentions(model):
        attn.recompute = bool(recompute)
    return model


@contextlib.contextmanager
def _mode(model: nn.Module, mode: str, collector: Callable | None = None, weights: bool = False):
    attns = list(wrapped_attentions(model))
    previous = [(a.mode, a.collector, a.collect_weights) for a in attns]
    for a in attns:
        a.mode, a.collector, a.collect_weights = mode, collector, weights
    try:
        yield model
    finally:
        for a, (m, c, w) in zip(attns, previous):
            a.mode, a.collector, a.collect_weights = m, c, w


def transfer_mode(model: nn.Module, collector: Callable, weights: bool | None = None):
    """Within the block each converted layer hands `TransferPair`s to `collector` and returns the
    teacher's output. `weights=True` adds the student and teacher attention weights `[B, H, T, T]` to
    each pair (mechanisms with a parallel weight form: linear, window_linear). `weights=None` reads the
    collector's `want_weights` attribute once, here (what `PairCollector(want_weights=...)` sets)."""
    if weights is None:
        weights = bool(getattr(collector, "want_weights", False))
    return _mode(model, "transfer", collector, weights)


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[dict]:
    """Within the block, a forward of `model` (or of any module holding converted layers) calibrates every
    converted layer that asks for it (`attention.init=calibrated`) from the teacher attention of that call's
    inputs, and returns the teacher's outputs, so each layer sees exact teacher inputs. Yields a dict that
    fills with {layer_idx: record of what was set}."""
    records: dict = {}

    def collect(item) -> None:
        layer_idx, record = item
        records[layer_idx] = record

    with _mode(model, "calibrate", collect):
        yield records


def calibration_tokens(model: nn.Module) -> int:
    """The most calibration tokens any converted layer under `model` asks for; 0 = nothing to calibrate."""
    return max((a.mechanism.calibration_tokens() for a in wrapped_attentions(model)), default=0)


def teacher_mode(model: nn.Module):
    """Within the block every converted layer runs its original softmax attention."""
    return _mode(model, "teacher")


@contextlib.contextmanager
def students_only_in(model: nn.Module, layers: Iterable[int]) -> Iterator[nn.Module]:
    """Within the block only the converted layers in `layers` run their student; every other converted
    layer runs its original softmax attention (the effect of converting just those layers)."""
    keep = set(layers)
    with teacher_mode(model):
        for a in wrapped_attentions(model):
            if a.layer_idx in keep:
                a.mode = "student"  # leaving teacher_mode restores every layer's own mode
        yield model
