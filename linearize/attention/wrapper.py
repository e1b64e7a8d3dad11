"""`LinearizedAttention`: the one wrapper that puts a student mechanism in front of a pretrained
attention module (`base_layer`, reused, never copied).

Modes:
- `student`: the student's output (inference, LoRA recovery, export);
- `transfer`: teacher and student from the same q/k/v; the pair of per-head outputs goes to the
  caller's collector and the *teacher's* output is returned, so every layer sees exact teacher inputs;
- `teacher`: the pretrained module itself (the KL teacher in LoRA recovery, without a second model);
- `calibrate`: the mechanism sets its new parameters from the teacher attention of this call's inputs
  (`Mechanism.calibrate`), hands the record to the collector as `(layer_idx, record)`, and the teacher's
  output is returned (`linearize.calibrating`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..ops._common import sliding_window_mask
from .base import Mechanism, Projected, RunOptions, repeat_heads
from .cache import student_layer

# Student mode under autograd recomputes the mechanism in backward (see `run_mechanism`); set it for a
# model with `linearize.set_recompute`.
RECOMPUTE_IN_BACKWARD = True


@dataclass
class TransferPair:
    """One converted layer's outputs before o_proj, `[B, T, H, D]`; weights `[B, H, T, T]` only when
    transfer mode collects them (`transfer_mode(..., weights=True)`)."""

    layer_idx: int
    student: torch.Tensor
    teacher: torch.Tensor
    student_weights: Optional[torch.Tensor] = None
    teacher_weights: Optional[torch.Tensor] = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[B, T, H, D]`, cos/sin `[B, T, D]` (the model's rotary embedding) → rotated x."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, D]
    return x * cos + rotate_half(x) * sin


def teacher_window(base_layer: nn.Module) -> Optional[int]:
    """The teacher's sliding window, if it has one (Mistral keeps it in the config, Qwen2/3 per layer)."""
    if hasattr(base_layer, "sliding_window"):
        return base_layer.sliding_window
    return getattr(getattr(base_layer, "config", None), "sliding_window", None)


def teacher_mask(t: int, window: Optional[int], device) -> Optional[torch.Tensor]:
    """`[T, T]` bool mask of the keys each query sees; None when plain causal (SDPA's is_causal path)."""
    if window is None or t <= window:
        return None
    return sliding_window_mask(t, t, window, device=device)  # [T, T]


def teacher_attention(
    p: Projected, want_weights: bool, scale: float, window: Optional[int] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The teacher's causal (optionally sliding-window) softmax attention in fp32 →
    (`[B, T, H, D]`, weights `[B, H, T, T]` or None). SDPA avoids a T×T matrix unless weights are asked for."""
    q = p.q_rope.float().transpose(1, 2)  # [B, H, T, D]
    mask = teacher_mask(q.shape[2], window, q.device)
    if not want_weights:
        # enable_gqa reads kv head h // group in place: no expanded copies of k and v.
        k = p.k_rope.float().transpose(1, 2)  # [B, H_kv, T, D]
        v = p.v.float().transpose(1, 2)  # [B, H_kv, T, D]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=p.group > 1
        )
        return y.transpose(1, 2), None
    k = repeat_heads(p.k_rope, p.group).float().transpose(1, 2)  # [B, H, T, D]
    v = repeat_heads(p.v, p.group).float().transpose(1, 2)  # [B, H, T, D]
    if mask is None:
        mask = sliding_window_mask(q.shape[2], q.shape[2], q.shape[2], device=q.device)  # causal: a T-key window
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, T, T]
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (weights @ v).transpose(1, 2), weights


def hides_earlier_keys(attention_mask: Optional[torch.Tensor]) -> bool:
    """True when the newest query of some row cannot see a key that comes before a key it can see:
    left padding. Right padding (hidden keys only after the visible ones) cannot reach earlier causal
    outputs, so it is allowed. attention_mask: the model's 4D mask `[B, 1, Tq, S]` (additive or bool; eager
    and SDPA) or the 2D padding mask `[B, S]` (1 = token; flash attention)."""
    if attention_mask is None or attention_mask.dim() not in (2, 4):
        return False
    last_row = attention_mask.bool() if attention_mask.dim() == 2 else attention_mask[:, 0, -1]  # [B, S]
    visible = last_row if last_row.dtype == torch.bool else last_row >= 0
    visible_after = visible.flip(-1).cumsum(-1).flip(-1) - visible.long()  # [B, S]: visible keys to the right
    return bool((~visible & (visible_after > 0)).any())


# Inputs the wrapper reads from every call, by these names in the wrapped attention's signature.
READ_ARGUMENTS = ("hidden_states", "position_embeddings", "attention_mask")
# Names transformers has given the attention's cache argument: `past_key_values` up to 5.23, `cache` from
# 5.24 (whose attentions still take `past_key_values` as a deprecated keyword).
CACHE_ARGUMENTS = ("cache", "past_key_values")


class AttentionSignature:
    """The wrapped attention's `forward` signature, read once. Every call is bound by name against it, so an
    argument keeps its meaning wherever the caller puts it, and a signature without an argument the wrapper
    reads fails when the model is converted, naming that argument, instead of mid-generation."""

    def __init__(self, base_layer: nn.Module):
        self.signature = inspect.signature(base_layer.forward)  # a bound method: no `self`
        names = self.signature.parameters
        where = f"{type(base_layer).__name__}.forward{self.signature} (transformers {transformers.__version__})"
        missing = [name for name in READ_ARGUMENTS if name not in names]
        if missing:
            raise UserError(f"{where} has no argument {missing[0]!r}, which linearize reads; this transformers "
                            f"version is not supported")
        cache = [name for name in CACHE_ARGUMENTS if name in names]
        if not cache:
            raise UserError(f"{where} has no cache argument (looked for {' or '.join(CACHE_ARGUMENTS)}); this "
                            f"transformers version is not supported")
        self.cache = cache[0]

    def bind(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        """The call's arguments by name, defaults filled in. A cache passed under another known name (the
        deprecated `past_key_values` of a 5.24 attention) is moved to the signature's own name first."""
        for alias in CACHE_ARGUMENTS:
            if alias != self.cache and alias in kwargs and alias not in self.signature.parameters:
                if kwargs.get(self.cache) is not None:
                    raise TypeError(f"attention called with both {alias!r} and {self.cache!r}")
                kwargs = dict(kwargs)
                kwargs[self.cache] = kwargs.pop(alias)
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound


class LinearizedAttention(nn.Module):
    def __init__(self, base_layer: nn.Module, mechanism: Mechanism, layer_idx: int, opts: RunOptions):
        super().__init__()
        self.base_layer = base_layer
        self.base_signature = AttentionSignature(base_layer)
        self.mechanism = mechanism
        self.layer_idx = layer_idx
        self.opts = opts
        self.mode = "student"
        self.window = teacher_window(base_layer)
        self.scaling = getattr(base_layer, "scaling", base_layer.head_dim**-0.5)
        self.collector: Optional[Callable[[TransferPair], None]] = None
        self.collect_weights = False  # transfer mode: also hand over `[B, H, T, T]` attention weights
        self.recompute = RECOMPUTE_IN_BACKWARD
        self._compiled: Optional[Callable] = None

    def project(self, hidden_states: torch.Tensor, position_embeddings) -> Projected:
        base = self.base_layer
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, base.head_dim)
        k_raw = base.k_proj(hidden_states).view(shape)  # [B, T, H_kv, D]
        q = base.q_proj(hidden_states).view(shape)  # [B, T, H, D]
        k = k_raw
        if getattr(base, "q_norm", None) is not None:  # Qwen3 normalizes q and k per head before RoPE
            q, k = base.q_norm(q), base.k_norm(k)
        v = base.v_proj(hidden_states).view(shape)  # [B, T, H_kv, D]
        cos, sin = position_embeddings
        return Projected(q, k, v, apply_rope(q, cos, sin), apply_rope(k, cos, sin), k_raw, hidden_states)

    def forward(self, *args, **kwargs):
        """Takes the wrapped attention's own arguments (bound by name: `AttentionSignature`)."""
        bound = self.base_signature.bind(args, kwargs)
        if self.mode == "teacher":
            return self.base_layer(*bound.args, **bound.kwargs)
        hidden_states, position_embeddings, attention_mask = (bound.arguments[name] for name in READ_ARGUMENTS)
        model_cache = bound.arguments[self.base_signature.cache]  # the model's DynamicCache, or None
        if self.window is None and hides_earlier_keys(attention_mask):
            raise UserError(
                "left-padded batches are not supported by linearized attention yet (the student states would "
                "include the padding); pad on the right or generate one sequence at a time"
            )
        p = self.project(hidden_states, position_embeddings)
        if self.mode == "calibrate":
            return self.output(self.calibrate(p), hidden_states), None
        cache = student_layer(model_cache, self.layer_idx) if model_cache is not None else None
        state = cache.state if cache is not None else None
        y, new_state = self.run_mechanism(p, state, want_state=cache is not None)
        if cache is not None:
            cache.advance(new_state, hidden_states.shape[1])
        if self.mode == "transfer":
            y = self.transfer(p, y)
        return self.output(y, hidden_states), None

    def output(self, y: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t = hidden_states.shape[:2]
        return self.base_layer.o_proj(y.to(hidden_states.dtype).reshape(b, t, -1))  # [B, T, H·D]

    @torch.no_grad()
    def calibrate(self, p: Projected) -> torch.Tensor:
        """Calibrates the mechanism on `p` when it asks for calibration; returns the teacher's output."""
        wanted = self.mechanism.calibration_tokens() > 0
        y_teacher, weights = teacher_attention(p, wanted, self.scaling, self.window)
        if wanted:
            record = self.mechanism.calibrate(p, y_teacher, weights, self.opts)
            if self.collector is not None:
                self.collector((self.layer_idx, record))
        return y_teacher

    def run_mechanism(self, p: Projected, state, want_state: bool):
        """The mechanism's (`[B, T, H, D]`, state). When training the whole model through it (student mode
        with gradients, no cache: LoRA recovery), its intermediates (scores, features, key blocks) are
        recomputed in backward instead of kept per layer: peak memory falls by most of the student
        attention's activations for about one more mechanism forward per step.

        With `opts.compile`, training calls (gradients on, no cache) run a torch.compile'd mechanism:
        inductor fuses the ops' elementwise passes (about 20% off the student's forward + backward on
        CPU, after a compile of ~15 s per new shape). Evaluation, prefill and decoding stay eager: their
        lengths vary, and each new length would recompile."""
        training = torch.is_grad_enabled() and state is None and not want_state
        mechanism = self.compiled_mechanism() if self.opts.compile and training else self.mechanism
        if not (self.recompute and self.mode == "student" and training):
            return mechanism(p, state, self.opts, want_state=want_state)
        return checkpoint(mechanism, p, None, self.opts, False, use_reentrant=False)

    def compiled_mechanism(self) -> Callable:
        """The mechanism's forward under torch.compile, built on first use (a plain function attribute,
        not a submodule: the state dict stays the same)."""
        if self._compiled is None:
            self._compiled = torch.compile(self.mechanism.forward, dynamic=False)
        return self._compiled

    def transfer(self, p: Projected, y_student: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y_teacher, w_teacher = teacher_attention(p, self.collect_weights, self.scaling, self.window)
        w_student = self.mechanism.attention_weights(p) if self.collect_weights else None
        if self.collector is not None:
            self.collector(TransferPair(self.layer_idx, y_student, y_teacher, w_student, w_teacher))
        return y_teacher

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, mechanism={self.mechanism.name}, mode={self.mode}"
