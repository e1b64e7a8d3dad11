"""The `qwen3_5` family map: a converted model whose delta-rule layers are native-form `gated_delta`
(`attention.native_family: qwen3_5`) → the config and weights of transformers' `Qwen3_5ForCausalLM`
(`model_type: qwen3_5_text`), a plain checkpoint engines load without remote code.

Per layer (../shared/METHODS.md §11, docs/export.md):
- `linear_attention` (a native student): `in_proj_qkv` = [W_q·diag(q fold) | W_k·diag(k fold) | W_v], with k and
  v rows, conv taps, `in_proj_b`, `in_proj_a`, `A_log` and `dt_bias` repeated per query head (head h reads
  kv head h // G, so each copy's state is its kv head's); `in_proj_z` = the output gate; `norm.weight` = the
  output norm weight; `out_proj` = the teacher's o_proj.
- `full_attention` (a kept softmax layer), by teacher (`SOFTMAX_MAPS`): `exact` for Qwen3 (q/k norm w → w − 1,
  gate rows of the doubled q_proj 0 so sigmoid gives 0.5, o_proj × 2); `widened` for the Llama family
  (see `widened_softmax`).
- block norms are zero-centred in the family: w → w − 1.

No runner here: the export stage calls `check_student`, `save`, and `logit_parity`."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ...dtypes import torch_dtype
from ...errors import UserError
from ...files import save_safetensors, write_json, write_text

ARCHITECTURE = "Qwen3_5ForCausalLM"
MODEL_TYPE = "qwen3_5_text"
MECHANISM = "gated_delta"
FAMILY = "qwen3_5"
CONV_KERNEL = 4
WEIGHTS_FILE = "model.safetensors"
# The widened map (Llama family): P extra channels per head whose q and k are a constant bias B, so that
# rms(q') and rms(k') are B·sqrt(P/D') up to a relative |q|²/(2·P·B²) (≈ 1e-7 here); the norm weights then
# undo that constant.
WIDEN_BIAS = 1e4
WIDEN_CHANNELS_SHARE = 4  # P = D / 4 extra channels: D/(D+P) = 0.8 of the head rotates


def zero_centred(weight: torch.Tensor) -> torch.Tensor:
    """The family's RMSNorms multiply by (1 + w): store w − 1 for a teacher's multiplier w."""
    return weight.float() - 1.0


# ------------------------------------------------------------------------------------------ checks

def student_layers(model: nn.Module) -> list[nn.Module]:
    return list(model.model.layers)


def check_student(model: nn.Module, text_config) -> None:
    """Refuses, in one line, what the family cannot express: a non-native student, no kept softmax layer,
    an unsupported teacher, biased projections in converted layers, a non-SwiGLU MLP."""
    record = getattr(model.config, "linearize", None) or {}
    attention = record.get("attention", {})
    mechanism = attention.get("mechanism")
    if mechanism != MECHANISM or attention.get("native_family") != FAMILY:
        raise UserError(f"export --format {FAMILY} needs a native-form {MECHANISM} student "
                        f"(attention.native_family: {FAMILY}); this run's mechanism is {mechanism}"
                        + ("" if mechanism != MECHANISM else " without the native form"))
    teacher = text_config.model_type
    if teacher not in SOFTMAX_MAPS:
        raise UserError(f"export --format {FAMILY} does not support {teacher!r} teachers; supported: "
                        f"{', '.join(SOFTMAX_MAPS)}")
    if getattr(text_config, "sliding_window", None) and getattr(text_config, "use_sliding_window", True):
        raise UserError(f"export --format {FAMILY}: the teacher's sliding window ({text_config.sliding_window}) "
                        "has no equivalent in the family's full-attention layers")
    if getattr(text_config, "hidden_act", "silu") != "silu" or getattr(text_config, "mlp_bias", False):
        raise UserError(f"export --format {FAMILY} needs a SwiGLU MLP without bias (hidden_act silu)")
    if "softmax" not in record.get("layers", {}).values():
        raise UserError(f"export --format {FAMILY} needs at least one full-attention (softmax) layer: "
                        "transformers cannot generate with a cache from a model without one")
    for idx, layer in enumerate(student_layers(model)):
        attn = layer.self_attn
        if not hasattr(attn, "mechanism"):
            continue
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            bias = getattr(attn.base_layer, name).bias
            if bias is not None and bool(bias.detach().abs().max() > 0):
                raise UserError(f"export --format {FAMILY}: layer {idx}'s {name} has a bias, which the family's "
                                "linear-attention layers cannot hold")


# ------------------------------------------------------------------------------------------ config

def layer_types(model: nn.Module) -> list[str]:
    return ["linear_attention" if hasattr(layer.self_attn, "mechanism") else "full_attention"
            for layer in student_layers(model)]


def widened_channels(head_dim: int) -> int:
    """P: extra channels per head such that D/(D+P) × (D+P) is exactly D in floating point (engines compute
    the rotary width as int(head_dim · partial_rotary_factor))."""
    p = max(2, head_dim // WIDEN_CHANNELS_SHARE)
    while int((head_dim + p) * (head_dim / (head_dim + p))) != head_dim:
        p += 2
    return p


def family_config(model: nn.Module, text_config, dtype: str) -> dict:
    """config.json of the export (`qwen3_5_text`)."""
    h, h_kv = text_config.num_attention_heads, text_config.num_key_value_heads
    d = getattr(text_config, "head_dim", None) or text_config.hidden_size // h
    softmax = SOFTMAX_MAPS[text_config.model_type]
    extra = widened_channels(d) if softmax is widened_softmax else 0
    rope = dict(text_config.rope_parameters or {})
    # Written explicitly: left out, qwen3_5 configs take 0.25.
    rope["partial_rotary_factor"] = d / (d + extra) if extra else 1.0
    biased = bool(extra)
    config = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": text_config.vocab_size,
        "hidden_size": text_config.hidden_size,
        "intermediate_size": text_config.intermediate_size,
        "num_hidden_layers": text_config.num_hidden_layers,
        "num_attention_heads": h,
        "num_key_value_heads": h_kv,
        "head_dim": d + extra,
        "hidden_act": "silu",
        "max_position_embeddings": text_config.max_position_embeddings,
        "rms_norm_eps": text_config.rms_norm_eps,
        "tie_word_embeddings": bool(getattr(text_config, "tie_word_embeddings", False)),
        "rope_parameters": rope,
        "attention_bias": biased,  # transformers reads q/k/v/o biases from here
        "qkv_bias": biased,  # vLLM reads them from here
        "attention_dropout": 0.0,
        "linear_conv_kernel_dim": CONV_KERNEL,
        "linear_num_key_heads": h,  # k repeated per query head (GQA), exact
        "linear_num_value_heads": h,
        "linear_key_head_dim": d,
        "linear_value_head_dim": d,
        "layer_types": layer_types(model),
        "bos_token_id": text_config.bos_token_id,
        "eos_token_id": text_config.eos_token_id,
        "pad_token_id": text_config.pad_token_id,
        "dtype": dtype,
        "use_cache": True,
    }
    return config


# ------------------------------------------------------------------------------------------ weights

def repeat_rows(weight: torch.Tensor, groups: int, group: int) -> torch.Tensor:
    """Rows of `groups` blocks (kv heads) → each block repeated `group` times in place (query head h reads
    kv head h // group): `[groups·n, ...]` → `[groups·group·n, ...]`."""
    blocks = weight.reshape(groups, -1, *weight.shape[1:])  # [H_kv, n, ...]
    return blocks.repeat_interleave(group, dim=0).reshape(-1, *weight.shape[1:])


def linear_layer(attn: nn.Module, h: int, h_kv: int, d: int) -> dict[str, torch.Tensor]:
    """A native gated_delta layer → `linear_attn.*` tensors."""
    base, mech = attn.base_layer, attn.mechanism
    g = h // h_kv
    fold_q = mech.q_fold.float().repeat(h)[:, None]  # [H·D, 1]
    fold_k = mech.k_fold.float().repeat(h_kv)[:, None]  # [H_kv·D, 1]
    w_q = base.q_proj.weight.float() * fold_q
    w_k = repeat_rows(base.k_proj.weight.float() * fold_k, h_kv, g)
    w_v = repeat_rows(base.v_proj.weight.float(), h_kv, g)
    conv = mech.conv_weight.float()  # [(H + 2·H_kv)·D, kernel]
    conv_q, conv_k, conv_v = conv.split([h * d, h_kv * d, h_kv * d])
    conv = torch.cat([conv_q, repeat_rows(conv_k, h_kv, g), repeat_rows(conv_v, h_kv, g)])  # [3·H·D, kernel]
    return {
        "in_proj_qkv.weight": torch.cat([w_q, w_k, w_v]),  # [3·H·D, hidden]
        "conv1d.weight": conv[:, None, :],  # [3·H·D, 1, kernel]
        "in_proj_z.weight": mech.out_gate.weight.float(),
        "in_proj_b.weight": repeat_rows(mech.beta_proj.weight.float(), h_kv, g),  # [H, hidden]
        "in_proj_a.weight": repeat_rows(mech.decay_proj.weight.float(), h_kv, g),
        "A_log": repeat_rows(mech.A_log.float(), h_kv, g),  # [H]
        "dt_bias": repeat_rows(mech.dt_bias.float(), h_kv, g),
        "norm.weight": mech.out_norm_weight.float(),
        "out_proj.weight": base.o_proj.weight.float(),
    }


def with_gate_rows(q: torch.Tensor, h: int, width: int) -> torch.Tensor:
    """q rows (or bias) `[H·width, ...]` → the family's doubled q_proj `[H·2·width, ...]`: per head [query |
    gate], the gate rows 0 (sigmoid(0) = 0.5, undone by o_proj × 2)."""
    per_head = q.reshape(h, width, *q.shape[1:])  # [H, width, ...]
    return torch.cat([per_head, torch.zeros_like(per_head)], dim=1).reshape(h * 2 * width, *q.shape[1:])


def bias_or_zeros(linear: nn.Linear) -> torch.Tensor:
    return linear.bias.float() if linear.bias is not None else torch.zeros(linear.out_features)


def exact_softmax(attn: nn.Module, h: int, h_kv: int, d: int, eps: float) -> dict[str, torch.Tensor]:
    """A Qwen3 attention → `self_attn.*`, exactly: its q/k norms are the family's (zero-centred), its output
    gains a gate of 0.5 that o_proj × 2 undoes."""
    tensors = {
        "q_proj.weight": with_gate_rows(attn.q_proj.weight.float(), h, d),
        "k_proj.weight": attn.k_proj.weight.float(),
        "v_proj.weight": attn.v_proj.weight.float(),
        "o_proj.weight": 2 * attn.o_proj.weight.float(),
        "q_norm.weight": zero_centred(attn.q_norm.weight),
        "k_norm.weight": zero_centred(attn.k_norm.weight),
    }
    if attn.q_proj.bias is not None:
        tensors.update({"q_proj.bias": with_gate_rows(attn.q_proj.bias.float(), h, d),
                        "k_proj.bias": bias_or_zeros(attn.k_proj), "v_proj.bias": bias_or_zeros(attn.v_proj),
                        "o_proj.bias": bias_or_zeros(attn.o_proj)})
    return tensors


def widen(rows: torch.Tensor, heads: int, d: int, extra: int, fill: float = 0.0) -> torch.Tensor:
    """Per head, `extra` new rows (or bias entries) of value `fill` after the D existing ones."""
    per_head = rows.reshape(heads, d, *rows.shape[1:])  # [heads, D, ...]
    pad = torch.full((heads, extra, *rows.shape[1:]), fill, dtype=per_head.dtype)
    return torch.cat([per_head, pad], dim=1).reshape(heads * (d + extra), *rows.shape[1:])


def widened_softmax(attn: nn.Module, h: int, h_kv: int, d: int, eps: float) -> dict[str, torch.Tensor]:
    """A Llama-family attention (no q/k norm) → the family's, which forces a per-head RMSNorm on q and k.
    Each head gets P extra channels with zero q/k rows and bias B: then rms(q') ≈ r = sqrt(P·B²/D' + eps)
    whatever q is, and the norm weight s = r·(D'/D)^(1/4) on the first D channels restores q·k·D^-1/2 under
    the family's D'^-1/2 scale; the extra channels' weight 0 (stored −1) removes them. RoPE turns only the
    first D channels (partial_rotary_factor D/D'); the extra v rows and o_proj columns are 0."""
    extra = widened_channels(d)
    wide = d + extra
    r = math.sqrt(extra * WIDEN_BIAS**2 / wide + eps)
    scale = r * (wide / d) ** 0.25
    norm = torch.cat([torch.full((d,), scale), torch.zeros(extra)])  # the multiplier (1 + w)
    o = attn.o_proj.weight.float().reshape(attn.o_proj.out_features, h, d)  # [hidden, H, D]
    o = torch.cat([o, torch.zeros(o.shape[0], h, extra)], dim=2).reshape(o.shape[0], h * wide)
    q_bias = widen(bias_or_zeros(attn.q_proj), h, d, extra, WIDEN_BIAS)
    return {
        "q_proj.weight": with_gate_rows(widen(attn.q_proj.weight.float(), h, d, extra), h, wide),
        "q_proj.bias": with_gate_rows(q_bias, h, wide),
        "k_proj.weight": widen(attn.k_proj.weight.float(), h_kv, d, extra),
        "k_proj.bias": widen(bias_or_zeros(attn.k_proj), h_kv, d, extra, WIDEN_BIAS),
        "v_proj.weight": widen(attn.v_proj.weight.float(), h_kv, d, extra),
        "v_proj.bias": widen(bias_or_zeros(attn.v_proj), h_kv, d, extra),
        "o_proj.weight": 2 * o,
        "o_proj.bias": bias_or_zeros(attn.o_proj),
        "q_norm.weight": zero_centred(norm),
        "k_norm.weight": zero_centred(norm),
    }


# teacher model_type -> how its kept softmax layers map onto the family's gated, q/k-normed attention.
SOFTMAX_MAPS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "qwen3": exact_softmax,
    "llama": widened_softmax,
    "mistral": widened_softmax,
    "qwen2": widened_softmax,
}


def family_state_dict(model: nn.Module, text_config) -> dict[str, torch.Tensor]:
    """Every tensor of the export under transformers' `Qwen3_5ForCausalLM` names (fp32)."""
    h, h_kv = text_config.num_attention_heads, text_config.num_key_value_heads
    d = getattr(text_config, "head_dim", None) or text_config.hidden_size // h
    softmax = SOFTMAX_MAPS[text_config.model_type]
    state = {"model.embed_tokens.weight": model.model.embed_tokens.weight.float(),
             "model.norm.weight": zero_centred(model.model.norm.weight)}
    if not getattr(text_config, "tie_word_embeddings", False):
        state["lm_head.weight"] = model.lm_head.weight.float()
    for idx, layer in enumerate(student_layers(model)):
        prefix = f"model.layers.{idx}."
        attn = layer.self_attn
        if hasattr(attn, "mechanism"):
            tensors = {f"linear_attn.{k}": v for k, v in linear_layer(attn, h, h_kv, d).items()}
        else:
            tensors = {f"self_attn.{k}": v for k, v in softmax(attn, h, h_kv, d, text_config.rms_norm_eps).items()}
        tensors.update({
            "input_layernorm.weight": zero_centred(layer.input_layernorm.weight),
            "post_attention_layernorm.weight": zero_centred(layer.post_attention_layernorm.weight),
            **{f"mlp.{name}.weight": getattr(layer.mlp, name).weight.float()
               for name in ("gate_proj", "up_proj", "down_proj")},
        })
        state.update({prefix + k: v for k, v in tensors.items()})
    return state


# ------------------------------------------------------------------------------------------ writing

def save(model: nn.Module, tokenizer, out_dir: Path, *, dtype: str = "float32", card: str = "",
         overwrite: bool = False) -> Path:
    """Writes the export (config.json, model.safetensors, tokenizer, generation_config.json, README.md)
    into a temporary folder beside `out_dir`, then moves it in: a refusal or failure leaves nothing.
    `model`: converted, LoRA merged, native layers bound (`bind_native_students`)."""
    out_dir = Path(out_dir)
    text_config = model.config.get_text_config(decoder=True)
    check_student(model, text_config)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"export path {out_dir} is not empty: choose another path, or overwrite it")
    target = torch_dtype(dtype)
    with torch.no_grad():
        state = {name: t.detach().to(target).contiguous() for name, t in family_state_dict(model, text_config).items()}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        write_json(tmp / "config.json", family_config(model, text_config, dtype))
        save_safetensors(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        generation_config(model).save_pretrained(tmp)
        write_text(tmp / "README.md", card)
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # shared like any model directory
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def generation_config(model: nn.Module):
    from transformers import GenerationConfig

    config = getattr(model, "generation_config", None)
    return GenerationConfig.from_dict(config.to_dict()) if config is not None else GenerationConfig.from_model_config(model.config)


def layer_map_lines(model: nn.Module) -> list[str]:
    """One line per run of equal layer types, e.g. `0-3: linear_attention (native gated_delta)`."""
    types = layer_types(model)
    lines, start = [], 0
    for idx in range(1, len(types) + 1):
        if idx == len(types) or types[idx] != types[start]:
            what = "native gated_delta" if types[start] == "linear_attention" else "teacher softmax, mapped"
            span = f"{start}" if idx - 1 == start else f"{start}-{idx - 1}"
            lines.append(f"- layers {span}: {types[start]} ({what})")
            start = idx
    return lines


@torch.no_grad()
def logit_parity(model: nn.Module, out_dir: Path, input_ids: torch.Tensor) -> dict:
    """Loads the export with plain transformers and compares fp32 logits with `model` on `input_ids`
    `[B, T]`: {max_abs_diff, max_abs_logit}."""
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    want = model(input_ids, use_cache=False).logits.float()
    got = exported(input_ids, use_cache=False).logits.float()
    return {"max_abs_diff": float((got - want).abs().max()), "max_abs_logit": float(want.abs().max())}


def model_card(source: str, recipe: dict, model: nn.Module, parity: Optional[dict]) -> str:
    """README.md of the export: source model, recipe, layer map, measured parity and engines."""
    text_config = model.config.get_text_config(decoder=True)
    widened = SOFTMAX_MAPS[text_config.model_type] is widened_softmax
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", f"base_model: {source}", "---", "",
        f"# {ARCHITECTURE} converted from {source}", "",
        f"A hybrid of Gated DeltaNet and softmax attention layers, converted from `{source}` by linearize and saved "
        f"as a plain `{MODEL_TYPE}` checkpoint: no remote code.", "",
        "## Recipe", "", "```json", json.dumps(recipe, indent=1, sort_keys=True, default=str), "```", "",
        "## Layers", "", *layer_map_lines(model), "",
        "## Parity", "",
    ]
    if parity:
        lines.append(f"fp32 logits of this checkpoint in transformers against linearize's own model: max |Δ| "
                     f"{parity['max_abs_diff']:.2e} at max |logit| {parity['max_abs_logit']:.1f}.")
    else:
        lines.append("Not measured at export time.")
    lines += ["", "## Engines", "",
              "- transformers ≥ 5.23: `AutoModelForCausalLM.from_pretrained(path)`.",
              "- vLLM: text-only `qwen3_5_text` checkpoints (vllm-project/vllm PR #50210)."]
    if widened:
        lines.append("- SGLang: not served (its qwen3_5 attention has no q/k/v biases, which this teacher's "
                     "softmax layers need).")
    else:
        lines.append("- SGLang: standalone text checkpoints (sgl-project/sglang PR #32401).")
    return "\n".join(lines) + "\n"
