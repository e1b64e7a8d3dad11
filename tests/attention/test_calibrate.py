"""`attention.init` for the gated delta family: the statistics read from the teacher's attention, what the
calibrated init sets from them, `copy` (random) and `zero_gate` (deterministic), and the stage integration
(`<stage>/calibration.json`)."""
import dataclasses
import json
import math

import pytest
import torch

import linearize
from attn_helpers import attention_config
from linearize.attention.calibrate import (SINK_KEYS, attention_statistics, channel_scale, log_decay_for_distance,
                                           window_mass_per_head)
from linearize.attention.gated_delta import INIT_OUT_GATE_BIAS

T = 64


def one_hot_weights(lag: int, heads: int = 2) -> torch.Tensor:
    """`[1, H, T, T]` weights where every query i ≥ lag puts all its mass on key i − lag (earlier queries:
    on key 0)."""
    w = torch.zeros(1, heads, T, T)
    for i in range(T):
        w[0, :, i, max(i - lag, 0)] = 1.0
    return w


def uniform_weights(heads: int = 2) -> torch.Tensor:
    mask = torch.ones(T, T).tril()
    return (mask / mask.sum(-1, keepdim=True)).expand(1, heads, T, T).clone()


def test_statistics_of_known_patterns():
    stats = attention_statistics(one_hot_weights(5), group=1)
    # exact: every read query (i ≥ T/2) puts its mass at lag 5, a single key: entropy 0
    assert torch.allclose(stats["distance"], torch.tensor([5.0, 5.0], dtype=torch.float64))
    assert torch.allclose(stats["entropy"], torch.zeros(2, dtype=torch.float64))
    uniform = attention_statistics(uniform_weights(), group=2)  # two query heads of one kv head
    assert uniform["distance"].shape == (1,)
    # uniform over the keys past the sinks: normalized entropy 1, mean lag the mean of 0..i−SINK_KEYS
    assert torch.allclose(uniform["entropy"], torch.ones(1, dtype=torch.float64))
    expected = sum((i - SINK_KEYS) / 2 for i in range(T // 2, T)) / (T // 2)
    assert math.isclose(float(uniform["distance"]), expected, rel_tol=1e-9)


def test_sink_mass_is_not_a_distance():
    """A head that parks half its mass on token 0 and the rest at lag 3 reads as distance 3."""
    w = 0.5 * one_hot_weights(3)
    w[..., 0] += 0.5
    assert torch.allclose(attention_statistics(w, group=1)["distance"], torch.full((2,), 3.0, dtype=torch.float64))


def test_decay_has_the_mean_distance_it_was_set_from():
    """Σ_n n γ^n (1 − γ) = γ / (1 − γ): the geometric weighting of the decay has mean distance d."""
    for d in (2.0, 37.0, 400.0):
        gamma = math.exp(float(log_decay_for_distance(torch.tensor(d))))
        lags = torch.arange(200_000, dtype=torch.float64)
        weights = gamma**lags * (1 - gamma)
        assert math.isclose(float((weights * lags).sum()), d, rel_tol=1e-6)


def test_window_mass():
    assert torch.allclose(window_mass_per_head(one_hot_weights(5), window=8), torch.ones(2, dtype=torch.float64))
    # a window of 8 keys holds lags 0..7, the query's own key included: lag 8 is outside
    assert torch.allclose(window_mass_per_head(one_hot_weights(7), window=8), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(window_mass_per_head(one_hot_weights(8), window=8), torch.zeros(2, dtype=torch.float64))


def test_channel_scale_recovers_a_known_scale():
    torch.manual_seed(0)
    o = torch.randn(2, 50, 3, 4)
    scale = torch.rand(3, 4) * 0.5 + 0.01  # [H, D]
    weight, gate, error = channel_scale(o, o * scale)
    torch.testing.assert_close((weight * gate).float(), scale, rtol=1e-5, atol=0)  # exact fit up to fp32 input
    assert float(error.max()) < 1e-6


def converted_model(make_tiny_model, mechanism, **overrides):
    model = make_tiny_model("llama")
    linearize.linearize_model(model, attention_config(mechanism, softmax_layers=[1], **overrides))
    return model


def ids(n, seed=0):
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mechanism", ["gated_delta", "kda", "gated_delta_window"])
def test_calibrating_sets_the_parameters_and_returns_teacher_outputs(make_tiny_model, mechanism):
    model = converted_model(make_tiny_model, mechanism)
    assert linearize.calibration_tokens(model) == 1024  # attention.calibration_tokens default
    tokens = ids(48)
    with torch.no_grad():
        with linearize.teacher_mode(model):
            teacher = model(tokens, use_cache=False).logits
        mech = model.model.layers[0].self_attn.mechanism
        before = {n: p.clone() for n, p in mech.named_parameters()}
        with linearize.calibrating(model) as records:
            calibrating = model(tokens, use_cache=False).logits
    assert torch.equal(calibrating, teacher)  # every layer passed the teacher's output on
    assert list(records) == [0]  # layer 1 kept softmax
    record = records[0]
    beta = torch.sigmoid(mech.beta_proj.bias)
    torch.testing.assert_close(beta.double(), (1 - torch.tensor(record["entropy"], dtype=torch.float64)).clamp(0.05, 0.95),
                               rtol=1e-5, atol=0)  # β = 1 − entropy, through fp32 parameters
    assert not torch.equal(mech.out_gate.bias, before["out_gate.bias"])
    assert not torch.equal(mech.out_norm_weight, before["out_norm_weight"])
    assert all(0 < e < 1 for e in record["relative_error"])  # the fit beats a zero output
    if mechanism == "gated_delta_window":
        assert not torch.equal(mech.window_logit, before["window_logit"])


def test_calibrated_fit_beats_the_uncalibrated_output(make_tiny_model):
    """After calibration the layer's output is closer to the teacher's than at the zero_gate init."""
    model = converted_model(make_tiny_model, "gated_delta")
    tokens = ids(48)
    errors = []
    for calibrate in (False, True):
        if calibrate:
            with torch.no_grad(), linearize.calibrating(model):
                model(tokens, use_cache=False)
        pairs = []
        with torch.no_grad(), linearize.transfer_mode(model, pairs.append):
            model(tokens, use_cache=False)
        errors.append(float((pairs[0].student - pairs[0].teacher).pow(2).mean()))
    assert errors[1] < 0.5 * errors[0]


def test_copy_is_random_and_zero_gate_deterministic(make_tiny_model):
    def new_params(init, seed):
        model = make_tiny_model("llama")
        torch.manual_seed(seed)  # after the tiny model, which seeds its own weights
        linearize.linearize_model(model, attention_config("gated_delta", init=init))
        mech = model.model.layers[0].self_attn.mechanism
        return {n: p.detach().clone() for n, p in mech.named_parameters()}

    a, b = new_params("copy", 0), new_params("copy", 1)
    assert not torch.equal(a["beta_proj.weight"], b["beta_proj.weight"])
    assert not torch.equal(a["out_gate.bias"], b["out_gate.bias"])
    assert not torch.equal(a["dt_bias"], b["dt_bias"]) and (a["A_log"].exp() >= 1).all()
    z0, z1 = new_params("zero_gate", 0), new_params("zero_gate", 1)
    assert all(torch.equal(z0[n], z1[n]) for n in z0)
    assert torch.all(z0["out_gate.bias"] == INIT_OUT_GATE_BIAS)
    assert linearize.calibration_tokens(converted_model(make_tiny_model, "gated_delta", init="zero_gate")) == 0


def test_a_run_records_its_calibration(tmp_path, tiny_tokenizer):
    from stages.pipeline import run_stages
    from test_stages import tiny_run_config

    cfg = tiny_run_config(tmp_path, tiny_tokenizer, attention={"mechanism": "gated_delta", "calibration_tokens": 40})
    cfg = dataclasses.replace(cfg, stages=["attention_transfer"])
    run_stages(cfg)
    record = json.loads((tmp_path / "runs" / "tiny" / "attention_transfer" / "calibration.json").read_text())
    assert record["init"] == "calibrated" and set(record["layers"]) == {"0", "1"}
    assert record["tokens"] >= 40
    assert {"beta", "half_life", "distance", "entropy", "relative_error"} <= set(record["layers"]["0"])
