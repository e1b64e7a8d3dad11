"""Model surgery: find the decoder layers of a supported architecture, wrap the selected attentions in
`LinearizedAttention`, undo it exactly, freeze everything but the student, and switch modes.

Decoder layers are found through one explicit table; any other architecture is refused. Surgery is the only
door through which the rest of the library (training, stages, benchmarks) builds or reaches student
mechanisms: `linearize_model` converts, `initial_students` gives the starting parameters, `modes` switches
what the converted layers compute, `calibration` sets a fresh student from its teacher's attention."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from ..attention import LinearizedAttention, RunOptions, build_mechanism, mechanism_factory
from ..config import AttentionConfig
from ..errors import UserError
from ..ops._common import BACKENDS, FORM_NAMES
from .calibration import calibrate, calibrating, calibration_rows, calibration_tokens
from .modes import students_only_in, teacher_mode, transfer_mode, wrapped_attentions


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


def head_dim_of(text_cfg) -> int:
    """The attention head width a decoder config implies (explicit `head_dim`, else hidden / heads)."""
    return getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads


def build_students(cfg: AttentionConfig, text_cfg, layers: Iterable[int]) -> dict[int, nn.Module]:
    """Fresh student mechanisms for `layers` (fp32, CPU), built in layer order from the current RNG state.
    The one place that decides the order in which students draw their random inits: a block-wise stage
    builds every initial student up front through it, an all-at-once stage builds them inside
    `linearize_model`, and both get the same parameters from the same seed."""
    return {idx: build_mechanism(cfg, text_cfg.num_attention_heads, text_cfg.num_key_value_heads,
                                 head_dim_of(text_cfg), text_cfg.hidden_size).to(torch.float32)
            for idx in sorted(layers)}


def initial_students(attention_config: Any, text_cfg, layers: Iterable[int]) -> dict[int, dict[str, torch.Tensor]]:
    """The initial student parameters of `layers`, as `linearize_model` would build them from the current
    RNG state (call right after seeding)."""
    cfg = as_attention_config(attention_config)
    return {idx: mechanism.state_dict() for idx, mechanism in build_students(cfg, text_cfg, layers).items()}


def linearize_model(model: nn.Module, attention_config: Any, layers: Optional[Iterable[int]] = None,
                    initial: Optional[dict[int, dict[str, torch.Tensor]]] = None) -> nn.Module:
    """Wrap the attention of `layers` (default: every selected layer of `attention_config`) in place and
    record the conversion in `model.config.linearize`. `model` is a causal LM or a lazily loaded decoder
    (`models.lazy.LazyDecoder`, whose `layers` must be loaded). The students start from `initial` (layer →
    state dict, from `initial_students`) when given, else freshly from the current RNG state. New parameters
    are fp32 on their layer's device."""
    cfg = as_attention_config(attention_config)
    check_run_options(cfg)
    decoder, layout = decoder_layers(model)
    if any(isinstance(getattr(layer, layout.attention, None), LinearizedAttention) for layer in decoder):
        raise UserError("this model is already linearized; call unlinearize_model first")
    text_cfg = model.config.get_text_config(decoder=True)
    opts = RunOptions(form=cfg.form, chunk_size=cfg.chunk_size, backend=cfg.backend, compile=cfg.compile)
    converted = selected_layers(cfg, len(decoder)) if layers is None else sorted(layers)
    for idx in converted:
        if not 0 <= idx < len(decoder) or not hasattr(decoder[idx], layout.attention):
            raise ValueError(f"layer {idx} is not a loaded decoder layer of this model")
    if initial is None:
        students = build_students(cfg, text_cfg, converted)
    else:
        with torch.random.fork_rng(devices=[]):  # the given states replace these inits: draw nothing
            students = build_students(cfg, text_cfg, converted)
        for idx, mechanism in students.items():
            mechanism.load_state_dict(initial[idx])
    for idx, mechanism in students.items():
        base = getattr(decoder[idx], layout.attention)
        device = next(base.parameters()).device
        if hasattr(mechanism, "bind_teacher"):  # a native-form student reads its teacher's norms and eps
            mechanism.bind_teacher(base, text_cfg)
        setattr(decoder[idx], layout.attention, LinearizedAttention(base, mechanism.to(device), idx, opts))
    model.config.linearize = {
        "attention": dataclasses.asdict(cfg),
        "layers": {str(i): (cfg.mechanism if i in converted else "softmax") for i in range(len(decoder))},
    }
    return model


def unlinearize_model(model: nn.Module) -> nn.Module:
    """Put every original attention module back (the same objects) and forget the conversion."""
    layers, layout = decoder_layers(model)
    for layer in layers:
        attn = getattr(layer, layout.attention, None)  # None: a layer a lazy decoder has not loaded
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


__all__ = [
    "ARCHITECTURES", "DecoderLayout", "as_attention_config", "build_students", "calibrate", "calibrating",
    "calibration_rows", "calibration_tokens", "check_run_options", "decoder_layers", "freeze_for_transfer",
    "head_dim_of", "initial_students", "linearize_model", "selected_layers", "set_recompute", "student_parameters",
    "students_only_in", "teacher_mode", "transfer_mode", "unlinearize_model", "wrapped_attentions",
]
