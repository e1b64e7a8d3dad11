"""`gated_delta` (Gated DeltaNet on the teacher's projections), `kda` (its per-key-channel decay
subclass) and `gated_delta_window` (with a sliding-window softmax half): forms agree, cached decoding and `generate` follow the full forward, stage 1 trains only the
new parameters, and a tiny run goes through every stage to an export that loads and decodes."""
import dataclasses
import json

import pytest
import torch
from transformers import DynamicCache

import linearize
from attn_helpers import attention_config, converted, greedy_by_full_forwards, rel_rms, set_form
from linearize.attention import COMMON_CONFIG_KEYS, RunOptions, build_mechanism
from linearize.errors import UserError
from test_stages import DELTA_MECHANISMS
from test_config_keys import BATCH, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, TOKENS, RecordingConfig, projected

# Chunk and recurrent forms of the op differ only by fp32 rounding (the op's own tests bound each against
# a float64 loop); through two layers and the LM head that stays far below this.
FORM_TOL = 1e-4
# Cached decoding runs the recurrent form per token, the full forward the chunk form: the same rounding
# argument as FORM_TOL, with the margin the other mechanisms' decode tests use.
DECODE_TOL = 2e-3
# The decay's parameters of each layer, beyond gated_delta's β, A_log, output norm and gate.
DECAY_PARAMS = {"gated_delta": {"decay_proj.weight", "dt_bias"},
                "kda": {"decay_down.weight", "decay_up.weight", "dt_bias"},
                "gated_delta_window": {"decay_proj.weight", "dt_bias"}}
# Mixing parameters beyond the output norm and gate: the window weight.
MIXING_PARAMS = {"gated_delta_window": {"window_logit"}}


def ids(n, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def test_declared_keys_are_the_keys_read():
    cfg = RecordingConfig(**dataclasses.asdict(attention_config("gated_delta", delta_rope=True)))
    module = build_mechanism(cfg, HEADS, KV_HEADS, HEAD_DIM, HIDDEN)
    module(projected(), None, RunOptions(), want_state=True)
    declared = linearize.mechanism_config_keys()["gated_delta"]
    assert cfg.read - {"mechanism"} == set(declared) - set(COMMON_CONFIG_KEYS) == {
        "delta_rope", "decay_from", "gate_norm", "init", "calibration_tokens", "native_family"}


def test_init_values():
    """β = 0.5, output gate ≈ 1, half-lives 128..512 tokens, at every token."""
    module = build_mechanism(attention_config("gated_delta"), HEADS, KV_HEADS, HEAD_DIM, HIDDEN)
    x = torch.randn(3, HIDDEN)
    beta = torch.sigmoid(module.beta_proj(x))
    assert torch.allclose(beta, torch.full_like(beta, 0.5))
    assert torch.sigmoid(module.out_gate(x)).min() > 0.99
    g = -torch.exp(module.A_log) * torch.nn.functional.softplus(module.decay_proj(x) + module.dt_bias)  # [3, H_kv]
    half_life = torch.log(torch.tensor(0.5)) / g
    assert torch.allclose(half_life[0], torch.tensor([128.0, 512.0]), rtol=1e-4)


def test_kda_decay_is_per_key_channel_and_starts_at_gated_delta_half_lives():
    """kda's g is [B, T, H_kv, K]; at init every channel of a head has gated_delta's half-life for that head
    (the zero-init up projection leaves dt_bias alone), so the two layers start equal."""
    torch.manual_seed(0)
    kda = build_mechanism(attention_config("kda"), HEADS, KV_HEADS, HEAD_DIM, HIDDEN)
    gdn = build_mechanism(attention_config("gated_delta"), HEADS, KV_HEADS, HEAD_DIM, HIDDEN)
    x = torch.randn(2, 5, HIDDEN)
    g_kda, g_gdn = kda.decay(x), gdn.decay(x)
    assert g_kda.shape == (2, 5, KV_HEADS, HEAD_DIM) and g_gdn.shape == (2, 5, KV_HEADS)
    assert torch.allclose(g_kda, g_gdn[..., None].expand_as(g_kda), rtol=1e-6, atol=0)
    half_life = torch.log(torch.tensor(0.5)) / g_kda[0, 0]  # [H_kv, K]
    assert torch.allclose(half_life, torch.tensor([128.0, 512.0])[:, None].expand_as(half_life), rtol=1e-4)
    assert kda.decay_down.weight.shape == (16, HIDDEN)  # attention.gate_rank, default 16
    p = projected()
    with torch.no_grad():
        assert torch.allclose(kda(p, None, RunOptions(), want_state=False)[0],
                              gdn(p, None, RunOptions(), want_state=False)[0], atol=1e-6)
    # a trained up projection spreads the channels of a head apart
    with torch.no_grad():
        kda.decay_up.weight.normal_()
    assert kda.decay(x)[0, 0, 0].std() > 0


@pytest.mark.parametrize("mechanism", DELTA_MECHANISMS)
@pytest.mark.parametrize("arch,delta_rope", [("llama", False), ("qwen3", True)])
def test_chunk_and_recurrent_forms_agree(make_tiny_model, arch, delta_rope, mechanism):
    """The tiny models have GQA (4 query heads over 2 kv heads); 37 tokens leave a partial chunk of 16."""
    model = converted(make_tiny_model, mechanism, arch=arch, delta_rope=delta_rope)
    with torch.no_grad():
        chunk = model(ids(37), use_cache=False).logits
        set_form(model, "recurrent")
        recurrent = model(ids(37), use_cache=False).logits
    assert rel_rms(chunk, recurrent) <= FORM_TOL


def test_rope_option_changes_the_output(make_tiny_model):
    outs = []
    for delta_rope in (False, True):
        model = converted(make_tiny_model, "gated_delta", delta_rope=delta_rope)
        with torch.no_grad():
            outs.append(model(ids(20), use_cache=False).logits)
    assert rel_rms(outs[0], outs[1]) > 1e-3


def test_parallel_form_is_refused(make_tiny_model):
    model = converted(make_tiny_model, "gated_delta", form="parallel")
    with pytest.raises(UserError, match="no 'parallel' form.*chunk, recurrent"):
        model(ids(5), use_cache=False)


@pytest.mark.parametrize("mechanism", DELTA_MECHANISMS)
def test_prefill_then_token_by_token_decoding_equals_full_forward(make_tiny_model, mechanism):
    model = converted(make_tiny_model, mechanism)
    tokens = ids(30, seed=1)
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(tokens[:, :12], past_key_values=cache, use_cache=True).logits]  # prefill: chunk form
        steps += [model(tokens[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(12, 30)]
    assert rel_rms(torch.cat(steps, dim=1), full) <= DECODE_TOL
    state = cache.layers[0].state
    if mechanism == "gated_delta_window":  # (window keys/values, delta state)
        window_state, state = state
        assert window_state is not None
    assert state.shape == (1, 2, 16, 16) and state.dtype == torch.float32  # [B, H_kv, K, V]


@pytest.mark.parametrize("mechanism", DELTA_MECHANISMS)
def test_greedy_and_beam_generate_match_full_forwards(make_tiny_model, mechanism):
    model = converted(make_tiny_model, mechanism, softmax_layers=[1])
    prompt = ids(8)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out, greedy_by_full_forwards(model, prompt, 6))
        # beam search reorders the cache each step: the delta-rule states must follow their beams
        beams = dict(max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(prompt, **beams), model.generate(prompt, use_cache=False, **beams))


@pytest.mark.parametrize("mechanism", DELTA_MECHANISMS)
def test_transfer_trains_only_the_new_parameters_and_they_round_trip(make_tiny_model, tmp_path, mechanism):
    from linearize.train.student import load_student, save_student

    model = make_tiny_model("llama")
    linearize.linearize_model(model, attention_config(mechanism))
    trainable = linearize.freeze_for_transfer(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    per_layer = {"A_log", "beta_proj.weight", "beta_proj.bias", "out_norm_weight", "out_gate.weight",
                 "out_gate.bias"} | DECAY_PARAMS[mechanism] | MIXING_PARAMS.get(mechanism, set())
    assert names == {f"model.layers.{i}.self_attn.mechanism.{n}" for i in range(2) for n in per_layer}
    assert len(trainable) == len(names)
    pairs = []
    with linearize.transfer_mode(model, pairs.append):
        model(ids(20), use_cache=False)
    torch.nn.functional.mse_loss(pairs[0].student, pairs[0].teacher).backward()
    # layer 0's loss reaches each of its new parameters (the zero-init projections included), except kda's
    # decay_down: behind the zero-init decay_up its gradient is exactly zero at step 0 (as LoRA's A)
    layer0 = {n.split("mechanism.")[1]: p for n, p in model.named_parameters() if p.requires_grad and ".layers.0." in n}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in layer0.items() if n != "decay_down.weight")
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    mech = model.model.layers[0].self_attn.mechanism
    assert {n for n, group in mech.param_groups().items() if group == "gates"} == (
        {"A_log", "beta_proj.weight", "beta_proj.bias"} | DECAY_PARAMS[mechanism])

    path = save_student(converted(make_tiny_model, mechanism), tmp_path / "student.safetensors")
    load_student(model, path)
    reference = converted(make_tiny_model, mechanism)
    with torch.no_grad():
        assert torch.equal(model(ids(10), use_cache=False).logits, reference(ids(10), use_cache=False).logits)


@pytest.mark.parity
@pytest.mark.parametrize("mechanism", DELTA_MECHANISMS)
def test_every_stage_then_load_export_and_decode(tmp_path, tiny_tokenizer, mechanism):
    from linearize.models.exported import load_export
    from linearize.train.evaluation import greedy_sample
    from stages.pipeline import run_stages
    from test_stages import STAGE_NAMES, tiny_run_config

    cfg = tiny_run_config(tmp_path, tiny_tokenizer, attention={"mechanism": mechanism})
    results = run_stages(cfg)
    run_dir = tmp_path / "runs" / "tiny"
    assert list(results) == STAGE_NAMES
    assert (run_dir / "attention_transfer" / "student.safetensors").is_file()  # stage 1 trained, not skipped
    assert results["evaluate"]["student_ppl"] > 1.0
    section = json.loads((run_dir / "export" / "config.json").read_text())["linearize"]
    assert section["attention"]["mechanism"] == mechanism
    assert set(section["layers"].values()) == {mechanism}
    model, tokenizer = load_export(run_dir / "export")
    assert len(greedy_sample(model, tokenizer, "The quick", 4)) > 0
    prompt = ids(6)
    with torch.no_grad():  # the export's cached decode is the full forward's
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parity
@pytest.mark.parametrize("mechanism", DELTA_MECHANISMS)
def test_export_loads_and_decodes_without_linearize(tmp_path, tiny_tokenizer, mechanism):
    """The export bundles the mechanism and the op (plain transformers, linearize blocked): same logits
    and greedy tokens as `load_export`."""
    import os
    import subprocess
    import sys

    from linearize.models.exported import load_export
    from test_export_hf import ATOL, NEW_TOKENS, STANDALONE, _export, _ids

    _, out = _export(tmp_path, tiny_tokenizer, "llama", mechanism, softmax_layers=[1])
    assert "lz_ops_gated_delta_rule_chunk.py" in os.listdir(out)
    ids = _ids()
    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "standalone.py").write_text(STANDALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run([sys.executable, "-I", str(tmp_path / "standalone.py"), str(out), str(tmp_path / "ids.pt"),
                             str(tmp_path / "result.pt")], cwd=outside, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "result.pt")
    loaded, _ = load_export(out)
    with torch.no_grad():
        want_logits = loaded(ids).logits
        want_generated = loaded.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        uncached = loaded.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, use_cache=False)
    torch.testing.assert_close(got["logits"], want_logits, atol=ATOL, rtol=0)
    assert torch.equal(got["generated"], want_generated) and torch.equal(want_generated, uncached)


@pytest.mark.parametrize("mechanism,shape", [("gated_delta", (BATCH, TOKENS, KV_HEADS)),
                                             ("kda", (BATCH, TOKENS, KV_HEADS, HEAD_DIM))])
def test_key_decay_has_no_parameters_and_follows_the_key_projection(mechanism, shape):
    """decay_from=key: g = logsigmoid(k_proj(x)) / gate_norm (gated_delta: the mean over the head dim), and
    no decay parameters exist."""
    module = build_mechanism(attention_config(mechanism, decay_from="key", gate_norm=8.0), HEADS, KV_HEADS,
                             HEAD_DIM, HIDDEN)
    names = {n for n, _ in module.named_parameters()}
    assert names == {"beta_proj.weight", "beta_proj.bias", "out_norm_weight", "out_gate.weight", "out_gate.bias"}
    p = projected()
    g = module.log_decay(p, p.hidden.float())
    want = torch.nn.functional.logsigmoid(p.k_raw.float()) / 8.0  # [B, T, H_kv, D]
    want = want.mean(-1) if mechanism == "gated_delta" else want
    assert g.shape == shape and torch.allclose(g, want)
    with torch.no_grad():
        o, _ = module(p, None, RunOptions(), want_state=False)
    assert torch.isfinite(o).all()
