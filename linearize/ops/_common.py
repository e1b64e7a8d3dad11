"""Helpers shared by the ops: shape checks, GQA head expansion, fp32 staging, chunk padding, and the
`backend=` / `form=` dispatch of the public functions.

Triton kernels live in `linearize/ops/<op>/triton.py` and are imported lazily, only when a call asks
for them (each op's `load_triton`, a relative import inside a function, which an export's flat bundle
follows too), so importing `linearize.ops` never imports triton. The optional fla backend (`_fla.py`, for the
ops whose semantics fla covers) is imported the same way."""
from __future__ import annotations

import warnings
from typing import Callable

import torch

# Added to the normalizer of normalized linear attention so an all-zero feature row cannot divide by 0.
NORMALIZE_EPS = 1e-6

# torch's vectorized CPU exp is about 4-50× slower on inputs whose result underflows fp32 (below about
# −87.3, and −inf): bench/cpu_exp.py. Masked and strongly decayed exponents are floored here first:
# exp(−87) ≈ 1.6e-38 is invisible next to any O(1) term, and masks then set exact zeros.
EXP_FLOOR = -87.0


class _FlooredExp(torch.autograd.Function):
    """exp(max(x, EXP_FLOOR)), backward `grad · y`. Autograd of clamp-then-exp would add two passes
    (a mask and a select) over the input in backward; here the floor counts as the identity, which moves
    the gradient of floored entries from 0 to at most 1.6e-38 · grad."""

    @staticmethod
    def forward(ctx, x):
        y = x.clamp(min=EXP_FLOOR).exp_()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y


class _MaskedExp(torch.autograd.Function):
    """exp(x) where `keep`, exactly 0 elsewhere, floored like `_FlooredExp`; backward `grad · y`, which is
    0 at masked entries because y is."""

    @staticmethod
    def forward(ctx, x, keep):
        # Masked entries are replaced before the exp: they may be huge and positive (a decay difference
        # read backwards), and inf · 0 would be NaN.
        y = torch.where(keep, x, EXP_FLOOR).clamp_(min=EXP_FLOOR).exp_().mul_(keep)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y, None


def floored_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(max(x, EXP_FLOOR)) as a new tensor (x is left untouched)."""
    return _FlooredExp.apply(x)


def masked_exp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(x) where `keep` (bool, broadcastable to x), exactly 0 elsewhere, never exponentiating below
    EXP_FLOOR: what `x.masked_fill(~keep, -inf).exp()` computes, without the slow underflow path."""
    return _MaskedExp.apply(x, keep)


# Backends every op accepts (also the model-level `attention.backend` choices). FLA_BACKENDS adds "fla"
# for the ops whose semantics fla's kernels cover (linear and gated linear attention); "auto" never picks it.
BACKENDS = ("auto", "torch", "triton")
FLA_BACKENDS = (*BACKENDS, "fla")
FORM_NAMES = ("chunk", "parallel", "recurrent")


def check_heads(num_q_heads: int, num_kv_heads: int) -> int:
    """Return the GQA group size `H // H_kv`; raise if the kv heads do not divide the query heads."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads ({num_kv_heads})")
    return num_q_heads // num_kv_heads


def check_same_tokens(**tensors: torch.Tensor) -> None:
    """Raise unless every tensor is `[B, T, H, D]` with one shared `B` and `T`."""
    ref_name, ref = next(iter(tensors.items()))
    for name, x in tensors.items():
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, T, H, D], got shape {tuple(x.shape)}")
        if x.shape[:2] != ref.shape[:2]:
            raise ValueError(f"{name} has [B, T] = {tuple(x.shape[:2])} but {ref_name} has {tuple(ref.shape[:2])}")


def heads_first_fp32(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`[B, T, H_x, D]` → fp32 `[B, num_heads, T, D]`, repeating each head `num_heads // H_x` times
    (query head h reads kv head `h // group`)."""
    group = check_heads(num_heads, x.shape[2])
    x = x.float().transpose(1, 2)  # [B, H_x, T, D]
    if group > 1:
        x = x.repeat_interleave(group, dim=1)  # [B, H, T, D]
    return x


def append_ones(v: torch.Tensor) -> torch.Tensor:
    """`[..., V]` → `[..., V + 1]`: the ones column makes one pass yield numerator and normalizer."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def pad_time(x: torch.Tensor, multiple: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad dimension `dim` at the end up to a multiple of `multiple`."""
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def key_lag(num_queries: int, num_keys: int, query_offset: int = 0, device=None) -> torch.Tensor:
    """`[Tq, Tk]` int: how far key j lies before query i, `(i + query_offset) − j` (query i sits at key
    position i + query_offset; negative lags are future keys)."""
    query_pos = torch.arange(query_offset, query_offset + num_queries, device=device)
    key_pos = torch.arange(num_keys, device=device)
    return query_pos[:, None] - key_pos[None, :]  # [Tq, Tk]


def sliding_window_mask(
    num_queries: int, num_keys: int, window_size: int, query_offset: int = 0, device=None
) -> torch.Tensor:
    """`[Tq, Tk]` bool: the keys in each query's causal sliding window of `window_size` keys, the query's
    own position included (`0 ≤ lag < window_size`, lag as in `key_lag`)."""
    lag = key_lag(num_queries, num_keys, query_offset, device)  # [Tq, Tk]
    return (lag >= 0) & (lag < window_size)


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def check_backend(backend: str, valid: tuple[str, ...] = BACKENDS) -> None:
    """Raise unless `backend` is one of `valid` (the backends of the calling op)."""
    if backend not in valid:
        raise ValueError(f"unknown backend {backend!r} for this op; valid backends: {', '.join(valid)}")


def check_form(form: str, backend: str, backends: tuple[str, ...] = BACKENDS) -> None:
    """Raise on an unknown form, a backend outside `backends`, or a Triton/fla request for a form only
    torch implements."""
    if form not in FORM_NAMES:
        raise ValueError(f"unknown form {form!r}; valid forms: {', '.join(FORM_NAMES)}")
    check_backend(backend, backends)
    if backend in ("triton", "fla") and form != "chunk":
        raise ValueError(f"backend={backend!r} implements only form='chunk', not form={form!r}")


def _load(load_triton: Callable[[], Callable]) -> Callable:
    try:
        return load_triton()
    except ImportError as err:
        raise ImportError(f"Triton backend unavailable: {err}") from err


def resolve_chunk_backend(
    backend: str,
    load_triton: Callable[[], Callable],
    torch_fn: Callable,
    sample: torch.Tensor,
    fla_fn: Callable | None = None,
) -> Callable:
    """The chunk implementation for `backend`: "torch" → `torch_fn`; "triton" → `load_triton()` (the op's
    lazy import of its kernel; ImportError if missing); "fla" → `fla_fn` (only ops that pass one accept it;
    the adapter imports fla itself); "auto" → Triton for CUDA tensors when importable, else `torch_fn`
    (never fla)."""
    check_backend(backend, BACKENDS if fla_fn is None else FLA_BACKENDS)
    if backend == "fla":
        return fla_fn
    if backend == "torch":
        return torch_fn
    if backend == "triton":
        return _load(load_triton)
    if not sample.is_cuda:
        return torch_fn
    try:
        return _load(load_triton)
    except ImportError as err:
        # auto falls back so CUDA machines without triton still run; the warning keeps a broken kernel
        # module from going unnoticed.
        warnings.warn(f"{err}; using the torch chunk form", stacklevel=4)  # the op's caller (via run_form)
        return torch_fn


def run_form(
    forms: dict[str, Callable],
    load_triton: Callable[[], Callable],
    args: tuple,
    kwargs: dict,
    *,
    form: str,
    backend: str,
    chunk_size: int,
    fla_fn: Callable | None = None,
):
    """The dispatch every op's public function shares: `forms[form](*args, **kwargs)`, where the chunk form
    runs on the implementation `backend` selects (`resolve_chunk_backend`) with `chunk_size`. Raises on an
    unknown form or backend first (`check_form`)."""
    check_form(form, backend, BACKENDS if fla_fn is None else FLA_BACKENDS)
    if form != "chunk":
        return forms[form](*args, **kwargs)
    impl = resolve_chunk_backend(backend, load_triton, forms["chunk"], args[0], fla_fn=fla_fn)
    return impl(*args, chunk_size=chunk_size, **kwargs)


def sink_mask(num_queries: int, num_keys: int, sink_tokens: int, query_offset: int = 0, device=None) -> torch.Tensor:
    """`[Tq, Tk]` bool: the attention-sink keys each query sees, the first `sink_tokens` keys at or before
    it (`j < sink_tokens`, `lag ≥ 0`; key and query positions as in `key_lag`)."""
    lag = key_lag(num_queries, num_keys, query_offset, device)  # [Tq, Tk]
    is_sink = torch.arange(num_keys, device=device) < sink_tokens  # [Tk]
    return is_sink[None, :] & (lag >= 0)


def sliding_window_sink_mask(
    num_queries: int, num_keys: int, window_size: int, sink_tokens: int = 0, query_offset: int = 0, device=None
) -> torch.Tensor:
    """`[Tq, Tk]` bool: each query's softmax keys, its sliding window (`sliding_window_mask`) plus the
    sinks (`sink_mask`)."""
    window = sliding_window_mask(num_queries, num_keys, window_size, query_offset, device)
    if sink_tokens <= 0:
        return window
    return window | sink_mask(num_queries, num_keys, sink_tokens, query_offset, device)
