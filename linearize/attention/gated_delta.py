"""`gated_delta`: Gated DeltaNet on the teacher's own projections.

Per kv head, the state `S [K, V]` follows the gated delta rule (`linearize.ops.gated_delta_rule`):
`S_t = (I − β_t k_t k_tᵀ) · exp(g_t) · S_{t−1} + β_t k_t v_tᵀ`, `o_t = D^-1/2 · S_tᵀ q_t`, with
- q, k: the frozen teacher projections, L2-normalized per head over the head dim (the delta rule's
  `I − β k kᵀ` is a contraction only for ‖k‖ ≤ 1), before RoPE unless `attention.delta_rope`;
- β = sigmoid(x·W_β + b_β) per kv head, from the layer input x;
- the decay, by `attention.decay_from`: `projection` (default), g = −exp(A_log) · softplus(x·W_dt + dt_bias)
  per kv head (Mamba2's A/dt decay); `key` (Liger-style, no new parameters), g = logsigmoid(k_proj(x)) /
  gate_norm from the teacher's own key projection, averaged over the head dim (kda: per key channel);
- the output: RMSNorm per head (learnable weight), times a sigmoid gate sigmoid(x·W_g + b_g) per channel.

The new parameters start so that the layer is the plain delta rule at β = 0.5, a half-life of a few
hundred tokens and an open output gate (see the constants below): `attention.init=zero_gate`. The default,
`attention.init=calibrated`, then sets them from the teacher's attention statistics (`calibrate.py`);
`attention.init=copy` draws them at random, as the anchors do.""" 
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..ops._common import sliding_window_sink_mask
from ..ops.gated_delta_rule import FORMS, chunk_gated_delta_rule
from .base import Mechanism
from .calibrate import (attention_statistics, beta_for_entropy, channel_scale, half_life, inverse_softplus,
                        log_decay_for_distance, logit, window_mass_per_head)
from .window_linear import norm_shares, sliding_window

# Initial decay half-lives in tokens, spread geometrically over the kv heads (one head: their geometric
# mean, 256): long enough that the state keeps context well past a typical sliding window, short enough
# that old keys fade within a 512–2K training sequence.
INIT_HALF_LIFE_MIN, INIT_HALF_LIFE_MAX = 128.0, 512.0
# Output gate bias: sigmoid(6) ≈ 0.9975, so the gate starts open and the layer starts as the plain
# (normalized) delta-rule output; a random or half-closed gate would scale the output away from the
# teacher's at step 0.
INIT_OUT_GATE_BIAS = 6.0
RMS_EPS = 1e-6
# Where the decay comes from (`attention.decay_from`): a small projection of the layer input, or the frozen
# key projection (no new parameters).
DECAY_SOURCES = ("projection", "key")


def init_dt_bias(num_heads: int) -> torch.Tensor:
    """dt_bias `[num_heads]` such that, with A_log = 0 and W_dt = 0, each head decays by half over its
    half-life h: exp(g·h) = 1/2 with g = −exp(0)·softplus(dt_bias), so softplus(dt_bias) = ln 2 / h and
    dt_bias = softplus⁻¹(ln 2 / h) = log(expm1(ln 2 / h)) (h = 256: ≈ −5.91)."""
    if num_heads == 1:
        half_lives = torch.tensor([math.sqrt(INIT_HALF_LIFE_MIN * INIT_HALF_LIFE_MAX)])
    else:
        half_lives = torch.logspace(math.log10(INIT_HALF_LIFE_MIN), math.log10(INIT_HALF_LIFE_MAX), num_heads)
    return torch.log(torch.expm1(math.log(2.0) / half_lives.double())).float()


class GatedDeltaAttention(Mechanism):
    name = "gated_delta"
    reads = ("delta_rope", "decay_from", "gate_norm", "init", "calibration_tokens", "native_family")

    def __new__(cls, cfg, *args, **kwargs):
        """`attention.native_family` set: the layer is built in that serving family's exact form
        (`NATIVE_FORMS`); only plain gated_delta has one."""
        family = cfg.native_family
        if family is None:
            return super().__new__(cls)
        if cls is not GatedDeltaAttention:
            raise UserError(f"attention.native_family={family} is for mechanism gated_delta only; "
                            f"mechanism {cls.name} has no native form")
        if family not in NATIVE_FORMS:
            raise UserError(f"unknown attention.native_family {family!r}; valid: {', '.join(NATIVE_FORMS)}")
        return super().__new__(NATIVE_FORMS[family])

    def __init__(self, cfg, num_heads, num_kv_heads, head_dim, hidden_size):
        super().__init__(cfg, num_heads, num_kv_heads, head_dim, hidden_size)
        self.use_rope = bool(cfg.delta_rope)
        # β: zero weights and bias give sigmoid(0) = 0.5 for every token, the middle of (0, 1): each write
        # replaces half of what the state held for that key, and sigmoid's slope is largest there, so
        # transfer can move β either way from the first step.
        self.beta_proj = nn.Linear(hidden_size, num_kv_heads, bias=True)
        nn.init.zeros_(self.beta_proj.weight)
        nn.init.zeros_(self.beta_proj.bias)
        # A_log = 0 (A = 1) and a zero decay projection leave softplus(dt_bias) alone to set the start half-life.
        self.decay_from = cfg.decay_from
        self.gate_norm = cfg.gate_norm
        self.init = cfg.init
        self.calibration_tokens_wanted = cfg.calibration_tokens
        if self.decay_from == "projection":
            self.A_log = nn.Parameter(torch.zeros(num_kv_heads))
            self.init_decay(cfg, hidden_size)
        self.out_norm_weight = nn.Parameter(torch.ones(head_dim))
        self.out_gate = nn.Linear(hidden_size, num_heads * head_dim, bias=True)
        nn.init.zeros_(self.out_gate.weight)
        nn.init.constant_(self.out_gate.bias, INIT_OUT_GATE_BIAS)
        if cfg.init == "copy":
            self.random_init()

    def random_init(self) -> None:
        """`attention.init=copy`: the new projections at PyTorch's default (random) init and the decay at
        Mamba2's random A ~ U(1, 16), dt ~ logU(1e-3, 1e-1): what an anchor that only copies q/k/v/o starts
        from. The output norm stays 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        if self.decay_from == "projection":
            with torch.no_grad():
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
                dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
                self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)

    def init_decay(self, cfg, hidden_size: int) -> None:
        """The decay's own parameters, with `decay` the two steps a subclass replaces (`kda`)."""
        self.decay_proj = nn.Linear(hidden_size, self.num_kv_heads, bias=False)
        nn.init.zeros_(self.decay_proj.weight)
        self.dt_bias = nn.Parameter(init_dt_bias(self.num_kv_heads))

    def key_decay(self, p) -> torch.Tensor:
        """Liger-style log decay from the frozen key projection, `[B, T, H_kv, D]` (before any averaging)."""
        return F.logsigmoid(p.k_raw.float()) / self.gate_norm

    def log_decay(self, p, x: torch.Tensor) -> torch.Tensor:
        if self.decay_from == "key":
            return self.key_decay(p).mean(-1)  # [B, T, H_kv]: one decay per head, the channels' mean
        return self.decay(x)

    def decay(self, x: torch.Tensor) -> torch.Tensor:
        """The log decay g ≤ 0 from the layer input x `[B, T, hidden]` (fp32): `[B, T, H_kv]`, one per kv head."""
        dt = F.softplus(F.linear(x, self.decay_proj.weight.float()) + self.dt_bias.float())  # [B, T, H_kv]
        return -torch.exp(self.A_log.float()) * dt

    def forward(self, p, state, opts, want_state):
        o, state = self.delta_branch(p, state, opts, want_state)
        return self.gated_output(o, p).to(p.v.dtype), state

    def delta_branch(self, p, state, opts, want_state):
        """The gated delta rule's output, RMS-normalized per head without the learned weight (fp32
        `[B, T, H, D]`), and the state."""
        if opts.form not in FORMS:
            # The delta rule has no T×T parallel form here (its inverse of I + strictly-lower β·KKᵀ is what
            # the chunk form computes blockwise).
            raise UserError(
                f"mechanism {self.name} has no {opts.form!r} form; set attention.form to one of: {', '.join(FORMS)}"
            )
        d = p.q.shape[-1]
        q, k = (p.q_rope, p.k_rope) if self.use_rope else (p.q, p.k)
        q = F.normalize(q.float(), dim=-1)  # [B, T, H, D], unit norm per head
        k = F.normalize(k.float(), dim=-1)  # [B, T, H_kv, D]
        x = p.hidden.float()  # [B, T, hidden]; fp32 even when the model was cast to bf16 after conversion
        beta = torch.sigmoid(F.linear(x, self.beta_proj.weight.float(), self.beta_proj.bias.float()))  # [B, T, H_kv]
        g = self.log_decay(p, x)  # [B, T, H_kv] (kda: [B, T, H_kv, D]), log decay ≤ 0
        o, state = chunk_gated_delta_rule(
            q, k, p.v.float(), g, beta, scale=d**-0.5, initial_state=state, output_final_state=want_state,
            **opts.op_kwargs(state, q.shape[1]),
        )  # o [B, T, H, D] fp32 (fp32 inputs), state [B, H_kv, D, D] fp32 or None
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        return o, (state if want_state else None)

    def gated_output(self, o: torch.Tensor, p) -> torch.Tensor:
        """o `[B, T, H, D]` (normalized) times the RMSNorm weight and the output gate sigmoid(x·W_g + b_g)."""
        b, t, h, d = o.shape
        x = p.hidden.float()
        gate = torch.sigmoid(F.linear(x, self.out_gate.weight.float(), self.out_gate.bias.float()))  # [B, T, H·D]
        return o * self.out_norm_weight.float() * gate.view(b, t, h, d)

    # ------------------------------------------------------------------------------------ calibration

    def calibration_tokens(self) -> int:
        """Teacher tokens `linearize.calibrating` should show this layer (0: it is not calibrated)."""
        return self.calibration_tokens_wanted if self.init == "calibrated" else 0

    def calibration_target(self, p, y_teacher, weights, opts) -> tuple[torch.Tensor, dict]:
        """What the delta branch's scaled output is fitted to, and the statistics its β and decay come from."""
        return y_teacher, attention_statistics(weights, p.group)

    @torch.no_grad()
    def calibrate(self, p, y_teacher: torch.Tensor, weights: torch.Tensor, opts) -> dict:
        """`attention.init=calibrated` (see `calibrate.py`): β and the decay from the statistics of the teacher's
        weights `[B, H, T, T]`, then the output norm weight and gate bias by least squares of this layer's
        output onto `y_teacher` `[B, T, H, D]`. Returns the record of what was set, per kv head / head."""
        target, stats = self.calibration_target(p, y_teacher, weights, opts)
        beta = beta_for_entropy(stats["entropy"])  # [H_kv]
        self.beta_proj.weight.zero_()
        self.beta_proj.bias.copy_(logit(beta))
        log_decay = log_decay_for_distance(stats["distance"])  # [H_kv]
        if self.decay_from == "projection":
            self.A_log.zero_()  # A = 1: softplus(dt_bias) alone is the start decay
            self.set_decay_bias(inverse_softplus(-log_decay))
        else:
            log_decay = self.key_decay(p).mean((0, 1, 3)).double()  # [H_kv]: fixed by the teacher's keys
        o, _ = self.delta_branch(p, None, opts, want_state=False)
        weight, gate, error = channel_scale(o, target)
        self.out_gate.weight.zero_()
        self.out_norm_weight.copy_(weight)
        self.out_gate.bias.copy_(logit(gate).flatten())
        record = {key: value.tolist() for key, value in stats.items()}
        record.update(beta=beta.tolist(), half_life=half_life(log_decay).tolist(),
                      relative_error=error.tolist(), tokens=int(weights.shape[0] * weights.shape[-1]))
        return record

    def set_decay_bias(self, dt_bias: torch.Tensor) -> None:
        """dt_bias `[H_kv]` (with A = 1 and a zero decay projection: softplus(dt_bias) = −g per token)."""
        self.decay_proj.weight.zero_()
        self.dt_bias.copy_(dt_bias)

    def param_groups(self):
        # β and the decay decide what the state keeps: gates. The output norm and gate rescale what the
        # layer emits: mixing (as window_linear's window weight).
        # The window weight (gated_delta_window) mixes its two halves: mixing, as window_linear's.
        groups = {"beta_proj": "gates", "decay_proj": "gates", "A_log": "gates", "dt_bias": "gates"}
        return {name: groups.get(name.split(".")[0], "mixing") for name, _ in self.named_parameters()}


class KimiDeltaAttention(GatedDeltaAttention):
    """`kda` (Kimi Delta Attention): `gated_delta` with one decay per key channel instead of per kv head,
    g = −exp(A_log)[:, None] · softplus(up(down(x)) + dt_bias) `[B, T, H_kv, D]`, through a low-rank
    projection `hidden → gate_rank → H_kv·D` (down without bias, up zero-init). A_log `[H_kv]` and dt_bias
    `[H_kv, D]` start at gated_delta's per-head half-lives, broadcast over the key channels, so the layer
    starts as gated_delta does and transfer can then spread the half-lives within a head."""

    name = "kda"
    reads = GatedDeltaAttention.reads + ("gate_rank",)

    def init_decay(self, cfg, hidden_size: int) -> None:
        num_kv_heads, head_dim = self.num_kv_heads, self.head_dim
        # down keeps its default (random) init and up is zero: the decay starts at dt_bias alone, and the
        # gradient reaches up from the first step (it would not reach either if both were zero).
        self.decay_down = nn.Linear(hidden_size, cfg.gate_rank, bias=False)
        self.decay_up = nn.Linear(cfg.gate_rank, num_kv_heads * head_dim, bias=False)
        nn.init.zeros_(self.decay_up.weight)
        self.dt_bias = nn.Parameter(init_dt_bias(num_kv_heads)[:, None].repeat(1, head_dim))  # [H_kv, D]

    def decay(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        z = F.linear(F.linear(x, self.decay_down.weight.float()), self.decay_up.weight.float())
        dt = F.softplus(z.view(b, t, self.num_kv_heads, self.head_dim) + self.dt_bias.float())  # [B, T, H_kv, D]
        return -torch.exp(self.A_log.float())[:, None] * dt

    def set_decay_bias(self, dt_bias: torch.Tensor) -> None:
        self.decay_up.weight.zero_()
        self.dt_bias.copy_(dt_bias[:, None].expand_as(self.dt_bias))  # [H_kv, D]: one half-life per head

    def log_decay(self, p, x: torch.Tensor) -> torch.Tensor:
        return self.key_decay(p) if self.decay_from == "key" else self.decay(x)  # [B, T, H_kv, D]

    def param_groups(self):
        groups = super().param_groups()
        groups.update({name: "gates" for name in groups if name.split(".")[0] in ("decay_down", "decay_up")})
        return groups


# gated_delta_window at init (zero_gate, copy): the window half keeps 90% weight (on SmolLM2 the teacher puts
# most of its mass within the last 64 keys), and the delta half starts at sigmoid(−2) ≈ 0.12 of its unit-RMS
# output, a small correction rather than an equal partner of an untrained state.
INIT_WINDOW_WEIGHT = 0.9
INIT_WINDOW_DELTA_GATE_BIAS = -2.0


class GatedDeltaWindowAttention(GatedDeltaAttention):
    """`gated_delta_window`: a sliding-window softmax over the last W keys (exact, with RoPE) plus the gated
    delta rule over the whole sequence, within each layer:

        y_t = sigmoid(w_h) · SWA_W(q_t; k, v) + gated_output(delta_t)

    The combination is a sum with a learned per-head window weight, not LoLCATs' shared normalizer: the delta
    rule's readout `S_tᵀ q_t` is a regression output, not a sum of positive weights with a normalizer to share.
    The teacher's own output splits the same way, y = m · (softmax over the window) + (1 − m) · (softmax over
    older keys) with m the window's attention mass, so w_h starts at logit(m) under calibration and the delta
    branch is fitted to the remainder y − m · SWA. The delta state reads every token, the window's included:
    delaying it by W (LoLCATs' split, no key counted twice) would need the β and decay of the last W tokens in
    the decode cache; with separately learned weights the overlap costs nothing. `sink_tokens=N` keeps the
    first N tokens in the window's softmax for every query. Decode state: (window and sink keys and values,
    delta state `[B, H_kv, D, D]`), bounded by W + N."""

    name = "gated_delta_window"
    reads = GatedDeltaAttention.reads + ("window_size", "sink_tokens")

    def __init__(self, cfg, num_heads, num_kv_heads, head_dim, hidden_size):
        super().__init__(cfg, num_heads, num_kv_heads, head_dim, hidden_size)
        self.window_size = cfg.window_size
        self.sink_tokens = cfg.sink_tokens
        self.window_logit = nn.Parameter(torch.full((num_heads,), math.log(INIT_WINDOW_WEIGHT / (1 - INIT_WINDOW_WEIGHT))))
        if cfg.init != "copy":
            nn.init.constant_(self.out_gate.bias, INIT_WINDOW_DELTA_GATE_BIAS)

    def forward(self, p, state, opts, want_state):
        window_state, delta_state = state if state is not None else (None, None)
        y_window, window_state = sliding_window(
            p, self.window_size, opts, window_state, want_state, self.sink_tokens
        )
        o, delta_state = self.delta_branch(p, delta_state, opts, want_state)
        weight = torch.sigmoid(self.window_logit.float())[:, None]  # [H, 1]
        y = weight * y_window.float() + self.gated_output(o, p)  # [B, T, H, D]
        return y.to(p.v.dtype), ((window_state, delta_state) if want_state else None)

    def branch_shares(self, p, opts):
        """Per token and head `[B, T, H]`: `window` = ‖σ(w)·SWA‖ / (‖σ(w)·SWA‖ + ‖gated delta output‖),
        `delta` = 1 − window."""
        y_window, _ = sliding_window(p, self.window_size, opts, None, False, self.sink_tokens)
        o, _ = self.delta_branch(p, None, opts, False)
        weight = torch.sigmoid(self.window_logit.float())[:, None]  # [H, 1]
        return norm_shares(weight * y_window.float(), self.gated_output(o, p), "delta")

    def calibration_target(self, p, y_teacher, weights, opts):
        stats = attention_statistics(weights, p.group, outside_window=self.window_size)
        # The window mass per query head (the kv-head average is for β and the decay).
        mass = self.softmax_mass(weights).clamp(0.01, 0.99)  # [H]
        self.window_logit.copy_(logit(mass))
        y_window, _ = sliding_window(p, self.window_size, opts, None, False, self.sink_tokens)
        return y_teacher.double() - mass[:, None] * y_window.double(), stats

    def softmax_mass(self, weights: torch.Tensor) -> torch.Tensor:
        """The teacher's mean mass `[H]` (float64) on the window half's keys (the last W and the sinks), over
        the second half of the queries."""
        if not self.sink_tokens:
            return window_mass_per_head(weights, self.window_size)
        t = weights.shape[-1]
        keys = sliding_window_sink_mask(t, t, self.window_size, self.sink_tokens, device=weights.device)  # [T, T]
        return (weights.double() * keys).sum(-1)[..., t // 2:].mean((0, 2))


# --------------------------------------------------------------------------------------- native forms

# The native form's conv starts as c·[0, 0, 0, 1] (the current token only): silu(c·u) ≈ c·u/2 for small c·u,
# and the L2 norms of q and k remove c, so q and k start within O(c·|u|) of today's gated_delta; v's scale c/2
# reaches the output norm (removed there when mean(o²) ≫ rms_norm_eps, else refitted by calibration).
NATIVE_CONV_TAP = 0.1
# v's tap: SiLU on v is what separates the native start from today's most (silu(t·v) = t·v/2 + t²v²/4 + …
# bends v's direction), and the output norm removes t only while mean(o²) ≫ rms_norm_eps. Measured on
# SmolLM2 at step 0 (docs/export.md, 2 × 512 news tokens): t = 4 → ppl 31.1K, 1 → 21.4K, 0.5 → 10.0K,
# 0.25 → 6.2K (smaller taps not measured on the real model).
NATIVE_CONV_TAP_V = 0.25
NATIVE_CONV_KERNEL = 4  # qwen3_5's linear_conv_kernel_dim
L2_EPS = 1e-6  # the family's L2 norm: x·rsqrt(Σx² + 1e-6)
# Ridge of the least-squares fit of a constant from the layer input (see `constant_direction`), relative to
# the mean eigenvalue of XᵀX: enough to keep the solve stable on few tokens, small against the fit itself.
CONSTANT_FIT_RIDGE = 1e-3


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_EPS)


def inverse_silu(y: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """z ≥ 0 with silu(z) = y for y ≥ 0 (silu is increasing there), by bisection on [0, y + 10]."""
    lo, hi = torch.zeros_like(y), y + 10.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        low = F.silu(mid) < y
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    return (lo + hi) / 2


def constant_direction(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """u `[hidden]` with x·u ≈ 1 for every token of x `[N, hidden]` (ridge least squares, float64), and the
    fit's RMS error: a bias-free projection then gives any constant c per output as x·(c·u)."""
    x = x.double()
    gram = x.T @ x  # [hidden, hidden]
    ridge = CONSTANT_FIT_RIDGE * gram.diagonal().mean()
    u = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=x.dtype, device=x.device), x.sum(0))
    return u, float((x @ u - 1).pow(2).mean().sqrt())


class Qwen35GatedDelta(GatedDeltaAttention):
    """`gated_delta` with `attention.native_family: qwen3_5`: exactly transformers' `Qwen3_5GatedDeltaNet`
    on the teacher's projections (../shared/METHODS.md §11), so `linearize export --format qwen3_5` maps it
    weight for weight:

        [q | k | v] = silu(causal depthwise conv4([W_q x | W_k x | W_v x]))      (no conv bias)
        q, k ← x·rsqrt(Σx² + 1e-6) per head;  β = sigmoid(x·W_b);  g = −exp(A_log)·softplus(x·W_a + dt_bias)
        o = gated delta rule (scale D^-1/2);  out = w ⊙ o·rsqrt(mean(o²) + rms_norm_eps) ⊙ silu(x·W_z)

    No RoPE and no q/k norm: a Qwen3 teacher's q/k norm weights are folded into W_q and W_k (the q/k input is
    w ⊙ W x; the L2 norm makes the RMS division redundant). β, the decay and the conv taps of k and v are per
    kv head as in the student (the export repeats them per query head, which is exact). Decode state: (conv
    prefix `[B, 3, (H + 2·H_kv)·D]`, delta state `[B, H_kv, D, D]`).

    The layer needs its teacher layer and config (`bind_teacher`): the fold weights, the model's
    rms_norm_eps, and (for a teacher with q norm) the pre-norm q projection."""

    def __init__(self, cfg, num_heads, num_kv_heads, head_dim, hidden_size):
        if cfg.mechanism != "gated_delta" or cfg.delta_rope or cfg.decay_from != "projection":
            what = ("delta_rope" if cfg.delta_rope else f"decay_from={cfg.decay_from}")
            raise UserError(f"attention.native_family=qwen3_5 cannot express attention.{what}")
        super().__init__(cfg, num_heads, num_kv_heads, head_dim, hidden_size)
        # The family's β and output gate have no bias (so `calibrate` fits the constants into the weights).
        self.beta_proj = nn.Linear(hidden_size, num_kv_heads, bias=False)
        nn.init.zeros_(self.beta_proj.weight)
        self.out_gate = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        nn.init.zeros_(self.out_gate.weight)  # silu(0) = 0: a closed gate until calibrated (or trained)
        channels = (num_heads + 2 * num_kv_heads) * head_dim
        conv = torch.zeros(channels, NATIVE_CONV_KERNEL)
        conv[:, -1] = NATIVE_CONV_TAP
        conv[(num_heads + num_kv_heads) * head_dim:, -1] = NATIVE_CONV_TAP_V
        self.conv_weight = nn.Parameter(conv)  # [C, kernel], C = [q | k | v] channels
        if cfg.init == "copy":
            self.random_init()
        self.norm_eps: float | None = None
        self.register_buffer("q_fold", torch.ones(head_dim), persistent=False)
        self.register_buffer("k_fold", torch.ones(head_dim), persistent=False)
        self.__dict__["teacher"] = None  # the wrapped teacher attention: a reference, not a submodule

    @torch.no_grad()
    def bind_teacher(self, base_layer: nn.Module, text_config) -> None:
        """Reads what the family's form needs from the teacher: rms_norm_eps, and q/k norm weights to fold."""
        self.norm_eps = float(text_config.rms_norm_eps)
        self.__dict__["teacher"] = base_layer
        for fold, norm in ((self.q_fold, "q_norm"), (self.k_fold, "k_norm")):
            module = getattr(base_layer, norm, None)
            fold.copy_(module.weight.float() if module is not None else torch.ones_like(fold))

    def inputs(self, p) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q `[B, T, H, D]`, k and v `[B, T, H_kv, D]` (fp32): the teacher's linear projections, with any
        q/k norm weight folded in."""
        if self.norm_eps is None:
            raise UserError("a native-form gated_delta layer was run before bind_teacher (call "
                            "linearize.attention.gated_delta.bind_native_students(model) after converting)")
        teacher = self.__dict__["teacher"]
        q = p.q
        if getattr(teacher, "q_norm", None) is not None:  # p.q is after the norm: the pre-norm projection
            q = teacher.q_proj(p.hidden).view_as(p.q)  # [B, T, H, D]
        return q.float() * self.q_fold, p.k_raw.float() * self.k_fold, p.v.float()

    def causal_conv(self, u: torch.Tensor, prefix) -> tuple[torch.Tensor, torch.Tensor]:
        """silu(depthwise causal conv) of u `[B, T, C]` after `prefix` `[B, kernel − 1, C]` (None: zeros, the
        start of a sequence) → (y `[B, T, C]`, the new prefix)."""
        if prefix is None:
            prefix = u.new_zeros(u.shape[0], NATIVE_CONV_KERNEL - 1, u.shape[2])
        full = torch.cat([prefix.to(u.dtype), u], dim=1)  # [B, kernel − 1 + T, C]
        y = F.conv1d(full.transpose(1, 2), self.conv_weight.float()[:, None], groups=u.shape[2])  # [B, C, T]
        return F.silu(y.transpose(1, 2)), full[:, full.shape[1] - (NATIVE_CONV_KERNEL - 1):]

    def delta_branch(self, p, state, opts, want_state):
        if opts.form not in FORMS:
            raise UserError(
                f"mechanism {self.name} has no {opts.form!r} form; set attention.form to one of: {', '.join(FORMS)}"
            )
        prefix, delta_state = state if state is not None else (None, None)
        q, k, v = self.inputs(p)
        b, t, h, d = q.shape
        u = torch.cat([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], dim=-1)  # [B, T, C]
        u, prefix = self.causal_conv(u, prefix)
        q, k, v = u.split([h * d, k.shape[2] * d, k.shape[2] * d], dim=-1)
        q = l2_normalize(q.reshape(b, t, h, d))  # [B, T, H, D]
        k = l2_normalize(k.reshape(b, t, -1, d))  # [B, T, H_kv, D]
        x = p.hidden.float()
        beta = torch.sigmoid(F.linear(x, self.beta_proj.weight.float()))  # [B, T, H_kv]
        o, delta_state = chunk_gated_delta_rule(
            q, k, v.reshape(b, t, -1, d), self.decay(x), beta, scale=d**-0.5, initial_state=delta_state,
            output_final_state=want_state, **opts.op_kwargs(state, t),
        )  # o [B, T, H, D] fp32
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return o, ((prefix, delta_state) if want_state else None)

    def gated_output(self, o: torch.Tensor, p) -> torch.Tensor:
        """o `[B, T, H, D]` (normalized) times the norm weight and the gate silu(x·W_z)."""
        b, t, h, d = o.shape
        gate = F.silu(F.linear(p.hidden.float(), self.out_gate.weight.float()))  # [B, T, H·D]
        return o * self.out_norm_weight.float() * gate.view(b, t, h, d)

    @torch.no_grad()
    def calibrate(self, p, y_teacher, weights, opts) -> dict:
        """gated_delta's calibrated β, decay and output scale, with the constants the family cannot hold as
        biases fitted into the weights: u with x·u ≈ 1 (`constant_direction`), then W_b = logit(β) ⊗ u and
        W_z = silu⁻¹(gate) ⊗ u. The decay keeps dt_bias (the family has it)."""
        target, stats = self.calibration_target(p, y_teacher, weights, opts)
        x = p.hidden.reshape(-1, p.hidden.shape[-1])  # [N, hidden]
        u, fit_error = constant_direction(x)
        beta = beta_for_entropy(stats["entropy"])  # [H_kv]
        self.beta_proj.weight.copy_(logit(beta)[:, None] * u[None])
        log_decay = log_decay_for_distance(stats["distance"])  # [H_kv]
        self.A_log.zero_()
        self.set_decay_bias(inverse_softplus(-log_decay))
        o, _ = self.delta_branch(p, None, opts, want_state=False)
        weight, gate, error = channel_scale(o, target)
        self.out_norm_weight.copy_(weight)
        self.out_gate.weight.copy_(inverse_silu(gate).flatten()[:, None] * u[None])
        record = {key: value.tolist() for key, value in stats.items()}
        record.update(beta=beta.tolist(), half_life=half_life(log_decay).tolist(), relative_error=error.tolist(),
                      constant_fit_rms=fit_error, tokens=int(weights.shape[0] * weights.shape[-1]))
        return record

    def param_groups(self):
        groups = super().param_groups()
        groups["conv_weight"] = "conv"
        return groups


# attention.native_family -> the form of gated_delta that family computes.
NATIVE_FORMS: dict[str, type[GatedDeltaAttention]] = {"qwen3_5": Qwen35GatedDelta}


def bind_native_students(model: nn.Module) -> nn.Module:
    """Hands every native-form layer of a converted model its teacher attention and config (`bind_teacher`);
    other layers are left alone. Idempotent."""
    from .wrapper import LinearizedAttention

    text_config = model.config.get_text_config(decoder=True)
    for module in model.modules():
        if isinstance(module, LinearizedAttention) and hasattr(module.mechanism, "bind_teacher"):
            module.mechanism.bind_teacher(module.base_layer, text_config)
    return model
