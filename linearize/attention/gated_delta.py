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
    reads = ("delta_rope", "decay_from", "gate_norm", "init", "calibration_tokens")

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
