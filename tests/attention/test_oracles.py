"""Each mechanism against its paper formula, written here as an explicit token loop in float64 from the
layer's projected q/k/v (so the tests catch a wrong gate source, RoPE in the wrong branch, a missing
conv or a wrong normalizer, which the forms-agree tests cannot)."""
import torch
import torch.nn.functional as F

from attn_helpers import (
    attention_config, converted, rel_rms, sliding_window_softmax,
)
from linearize import linearize_model

# fp32 mechanism vs float64 loop over 16 tokens: rounding sits near 1e-7.
ORACLE_TOL = 1e-5
# The ops add this to the normalizer of normalized (gated) linear attention.
NORMALIZE_EPS = 1e-6
SEQ = 16


def projected(model, seed=7):
    """Layer 0's wrapper and its `Projected` inputs for a random hidden sequence `[2, SEQ, hidden]`."""
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(2, SEQ, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(SEQ)[None])
    with torch.no_grad():
        p = attn.project(hidden, position_embeddings)
        y, _ = attn.mechanism(p, None, attn.opts, want_state=False)
    return attn, p, y


def expand(x, group):
    return x.double().repeat_interleave(group, dim=2)  # [B, T, H, ·]


def gated_loop(fq, fk, v, log_decay, normalize):
    """S_t = diag(exp(g_t)) S_{t−1} + fk_t v_tᵀ; o_t = fq_tᵀ S_t (÷ fq_tᵀ z_t when normalized).
    All inputs `[B, T, H, ·]` with query heads; returns `[B, T, H, V]`."""
    b, t, h, f = fk.shape
    state = torch.zeros(b, h, f, v.shape[-1], dtype=torch.float64)
    z = torch.zeros(b, h, f, dtype=torch.float64)
    out = []
    for i in range(t):
        decay = log_decay[:, i].exp()  # [B, H, F]
        state = decay[..., None] * state + fk[:, i, :, :, None] * v[:, i, :, None, :]
        z = decay * z + fk[:, i]
        num = torch.einsum("bhf,bhfv->bhv", fq[:, i], state)
        out.append(num / ((fq[:, i] * z).sum(-1, keepdim=True) + NORMALIZE_EPS) if normalize else num)
    return torch.stack(out, dim=1)


def test_linear_is_normalized_linear_attention_after_rope(make_tiny_model):
    model = converted(make_tiny_model, "linear")
    attn, p, y = projected(model)
    maps = attn.mechanism.feature_maps
    with torch.no_grad():
        fq = maps.q(p.q_rope).double()
        fk = maps.k(expand(p.k_rope, p.group).float()).double()
    zero_decay = torch.zeros_like(fk)
    ref = gated_loop(fq, fk, expand(p.v, p.group), zero_decay, normalize=True)
    assert rel_rms(y, ref) <= ORACLE_TOL


def test_liger_gate_comes_from_the_key_projection_before_rope(make_tiny_model):
    model = converted(make_tiny_model, "liger", "qwen3")
    attn, p, y = projected(model)
    hidden_k = attn.base_layer.k_proj  # the gate source: k_proj(x), before the q/k norm and RoPE
    assert torch.equal(p.k_raw.flatten(2), hidden_k(p.hidden))
    g = expand(F.logsigmoid(p.k_raw.double()) / attn.mechanism.gate_norm, p.group)
    fq = p.q.double().softmax(-1)  # no RoPE in the gated branch
    fk = expand(p.k, p.group).softmax(-1)
    ref = gated_loop(fq, fk, expand(p.v, p.group), g, normalize=False)
    assert rel_rms(y, ref) <= ORACLE_TOL


def test_liger_window_mixes_sliding_window_and_gated_halves(make_tiny_model):
    model = converted(make_tiny_model, "liger_window", liger_alpha=0.3, liger_beta=0.7, window_size=4)
    attn, p, y = projected(model)
    g = expand(F.logsigmoid(p.k_raw.double()) / attn.mechanism.gate_norm, p.group)
    gla = gated_loop(p.q.double().softmax(-1), expand(p.k, p.group).softmax(-1), expand(p.v, p.group), g, False)
    ref = 0.3 * sliding_window_softmax(p, 4) + 0.7 * gla
    assert rel_rms(y, ref) <= ORACLE_TOL


def causal_conv(x, weight):
    """Depthwise causal conv by hand: y_t = Σ_j w_j x_{t−(K−1)+j}, zeros before the start. x `[B, T, C]`."""
    kernel = weight.shape[-1]
    padded = F.pad(x.double(), (0, 0, kernel - 1, 0))  # [B, K − 1 + T, C]
    w = weight.double()[:, 0]  # [C, K]
    return sum(padded[:, j : j + x.shape[1]] * w[:, j] for j in range(kernel))


def test_lawcat_conv_shared_map_low_rank_gate_normalized(make_tiny_model):
    model = converted(make_tiny_model, "lawcat")
    attn, p, y = projected(model)
    mech = attn.mechanism
    b, t, h, d = p.q.shape
    with torch.no_grad():
        q = causal_conv(p.q.flatten(2), mech.conv_q.weight).view(b, t, h, d)  # no RoPE in this branch
        k = causal_conv(p.k.flatten(2), mech.conv_k.weight).view(b, t, -1, d)
        fq = mech.feature_map(q.float()).double()  # one map for q and k
        fk = mech.feature_map(expand(k, p.group).float()).double()
        gate = F.logsigmoid(mech.gate_up(mech.gate_down(p.hidden)).double()) / mech.gate_norm
    g = expand(gate.view(b, t, -1, fq.shape[-1]), p.group)  # one gate per kv head, shared by its group
    ref = gated_loop(fq, fk, expand(p.v, p.group), g, normalize=True)
    assert rel_rms(y, ref) <= ORACLE_TOL


def test_lawcat_conv_starts_near_identity(make_tiny_model):
    model = make_tiny_model("llama")
    linearize_model(model, attention_config("lawcat"))
    weight = model.model.layers[0].self_attn.mechanism.conv_q.weight[:, 0]  # [C, K]
    assert torch.all(weight[:, -1] == 1.0) and torch.all(weight[:, :-1] == 1e-3)


def test_window_linear_hybrid_formula(make_tiny_model):
    window = 4
    model = converted(make_tiny_model, "window_linear", window_size=window)
    attn, p, y = projected(model)
    mech = attn.mechanism
    q = p.q_rope.double().transpose(1, 2)  # [B, H, T, D]
    k = expand(p.k_rope, p.group).transpose(1, 2)  # [B, H, T, D]
    v = expand(p.v, p.group).transpose(1, 2)  # [B, H, T, D]
    with torch.no_grad():
        fq = mech.feature_maps.q(p.q_rope).double().transpose(1, 2)  # [B, H, T, F]
        fk = mech.feature_maps.k(expand(p.k_rope, p.group).float()).double().transpose(1, 2)
    lag = torch.arange(SEQ)[:, None] - torch.arange(SEQ)[None, :]  # [T, T]
    in_window, older = (lag >= 0) & (lag < window), lag >= window
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, T, T]
    scores = scores.masked_fill(~in_window, float("-inf"))
    gamma = torch.sigmoid(mech.window_logit.detach().double())[None, :, None, None]
    a_sm = gamma * (scores - scores.amax(-1, keepdim=True)).exp()
    a_lin = (fq @ fk.transpose(-1, -2)) * older
    weights = a_sm + a_lin
    ref = ((weights @ v) / weights.sum(-1, keepdim=True)).transpose(1, 2)  # [B, T, H, D]
    assert rel_rms(y, ref) <= ORACLE_TOL
