"""Branch diagnostics of the hybrid mechanisms (`linearize.evals.branches`): per converted layer the
window and linear / delta shares of the attention output sum to one, a window-only setting reads as
100% window, window_linear's share is its normalizer's softmax mass, and the evaluate stage's record
becomes a table and a stacked bar plot in the report."""
import pytest
import torch

from attention.attn_helpers import converted  # tests/attention/, a namespace package here
from linearize.evals.branches import branch_shares

# Shares are float64 means of fp32 per-token values that sum to one: exact up to float rounding.
SUM_TOL = 1e-9
# fp32 mechanism vs the float64 formula (same rounding as tests/attention/test_oracles.py).
ORACLE_TOL = 1e-5
SEQ = 12
HYBRIDS = {
    "window_linear": ("window_linear", {}, "linear"),
    "window_linear_sinks": ("window_linear", {"sink_tokens": 2}, "linear"),
    "liger_window": ("liger_window", {}, "linear"),
    "gated_delta_window": ("gated_delta_window", {"init": "zero_gate"}, "delta"),
}


def tokens(rows=2, seed=0):
    return torch.randint(0, 256, (rows, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("setting", list(HYBRIDS))
def test_shares_sum_to_one_per_layer(make_tiny_model, setting):
    mechanism, overrides, other = HYBRIDS[setting]
    model = converted(make_tiny_model, mechanism, window_size=3, **overrides)
    shares = branch_shares(model, tokens())
    assert list(shares["layers"]) == ["0", "1"] and shares["tokens"] == 2 * SEQ
    for row in shares["layers"].values():
        assert row["mechanism"] == mechanism and set(row) == {"mechanism", "window", other}
        assert abs(row["window"] + row[other] - 1.0) <= SUM_TOL
        assert 0.0 < row["window"] < 1.0  # both branches carry part of the output at this init


@pytest.mark.parametrize(
    "mechanism,overrides",
    [
        ("window_linear", {"window_only": True}),  # the sliding-window baseline
        ("window_linear", {"window_size": SEQ}),  # every key inside the window
        ("window_linear", {"window_size": 2, "sink_tokens": SEQ}),  # every key a sink
        ("liger_window", {"liger_beta": 0.0}),  # the gated linear half weighted 0
    ],
)
def test_window_only_settings_read_as_all_window(make_tiny_model, mechanism, overrides):
    model = converted(make_tiny_model, mechanism, **overrides)
    for row in branch_shares(model, tokens())["layers"].values():
        # the shares are exact ones/zeros or one minus a float32 mass: rounding only
        assert row["window"] == pytest.approx(1.0, abs=1e-6) and row["linear"] == pytest.approx(0.0, abs=1e-6)


def test_a_linear_only_liger_window_reads_as_no_window(make_tiny_model):
    model = converted(make_tiny_model, "liger_window", liger_alpha=0.0)
    for row in branch_shares(model, tokens())["layers"].values():
        assert row["window"] == 0.0 and row["linear"] == 1.0


def test_non_hybrids_have_no_shares(make_tiny_model):
    assert branch_shares(converted(make_tiny_model, "linear"), tokens()) is None


def test_window_linear_share_is_the_normalizers_softmax_mass(make_tiny_model):
    """Per token and head: Σ a_sm / (Σ a_sm + Σ a_lin), from the float64 formula (sinks in a_sm)."""
    window, sinks = 3, 2
    model = converted(make_tiny_model, "window_linear", window_size=window, sink_tokens=sinks)
    attn = model.model.layers[0].self_attn
    mech = attn.mechanism
    hidden = torch.randn(1, SEQ, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        p = attn.project(hidden, model.model.rotary_emb(hidden, torch.arange(SEQ)[None]))
        share = mech.branch_shares(p, attn.opts)["window"]  # [B, T, H]
        fq = mech.feature_maps.q(p.q_rope).double().transpose(1, 2)  # [B, H, T, F]
        fk = mech.feature_maps.k(p.k_rope.repeat_interleave(p.group, dim=2)).double().transpose(1, 2)
    q = p.q_rope.double().transpose(1, 2)  # [B, H, T, D]
    k = p.k_rope.double().repeat_interleave(p.group, dim=2).transpose(1, 2)  # [B, H, T, D]
    lag = torch.arange(SEQ)[:, None] - torch.arange(SEQ)[None, :]  # [T, T]
    soft = (lag >= 0) & ((lag < window) | (torch.arange(SEQ)[None, :] < sinks))
    scores = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).masked_fill(~soft, float("-inf"))
    gamma = torch.sigmoid(mech.window_logit.detach().double())[None, :, None, None]
    a_sm = (gamma * (scores - scores.amax(-1, keepdim=True)).exp()).sum(-1)  # [B, H, T]
    a_lin = ((fq @ fk.transpose(-1, -2)) * ((lag >= 0) & ~soft)).sum(-1)  # [B, H, T]
    ref = (a_sm / (a_sm + a_lin)).transpose(1, 2)  # [B, T, H]
    assert (share - ref).abs().max() <= ORACLE_TOL


def test_evaluate_records_a_plot_and_the_report_shows_it(make_tiny_model, tmp_path):
    from stages.evaluate import _branch_shares
    from stages.report import write_report

    model = converted(make_tiny_model, "gated_delta_window", init="zero_gate")
    shares = _branch_shares(model, tokens(), tmp_path / "evaluate")
    assert (tmp_path / "evaluate" / shares["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "evaluate").glob("*.partial"))
    evaluation = {"sequences": 2, "tokens": 2 * SEQ, "student_ppl": 3.0, "branch_shares": shares}
    report = write_report(tmp_path, {"evaluate": "ran"}, {"evaluate": evaluation}).read_text()
    assert "### Branch shares" in report and f"![branch shares](evaluate/{shares['plot']})" in report
    for layer, row in shares["layers"].items():
        assert f"| {layer} | gated_delta_window | {row['window']:.3f} | {row['delta']:.3f} |" in report
