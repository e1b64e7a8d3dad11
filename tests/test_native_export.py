"""Native-form gated_delta students (`attention.native_family: qwen3_5`) exported as a plain
`Qwen3_5ForCausalLM` checkpoint (`linearize.models.families.qwen3_5`): the export loads with plain
transformers in a process where linearize cannot be imported, gives the linearize model's logits, decodes
the same with and without a cache, and serves a left-padded batch row by row; refusals write nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from linearize.models.standalone import BLOCK_LINEARIZE
from transformers import AutoTokenizer, DynamicCache

import linearize
from linearize.attention.gated_delta import Qwen35GatedDelta, bind_native_students
from linearize.config import AttentionConfig
from linearize.errors import UserError
from linearize.models.families import qwen3_5

from conftest import tiny_model

# fp32 on both sides; the two sides run different chunkings of the same delta rule and conv (transformers'
# reference code against linearize's ops): only float reordering differs, ~1e-6 at |logit| ≈ 10.
LOGIT_ATOL = 1e-4
# Cached decoding (recurrent form per token) against the full forward (chunk form): fp32 reordering.
DECODE_TOL = 1e-4
LOGIT_SCALE = 25.0  # lm_head × this puts the tiny models' logits at |logit| ≈ 10, the scale the bar names
NEW_TOKENS = 32
NUDGE = 0.3  # noise on the student's own parameters: far from the init, so a dropped tensor shows
# 3 layers, the middle one kept softmax: linear / full / linear, with GQA 2:1 (conftest's tiny config).
LAYERS = 3
SOFTMAX = [1]


def native_student(arch: str, seed: int = 0, **attention):
    """A tiny converted native-form student, bound, with every student parameter and norm moved off its init."""
    model = tiny_model(arch, seed=seed, num_hidden_layers=LAYERS)
    cfg = dict(mechanism="gated_delta", native_family="qwen3_5", chunk_size=16, softmax_layers=SOFTMAX)
    cfg.update(attention)
    linearize.linearize_model(model, AttentionConfig(**cfg))
    bind_native_students(model)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mechanism." in name or "norm" in name:
                param.add_(NUDGE * torch.randn(param.shape, generator=gen))
        model.lm_head.weight.mul_(LOGIT_SCALE)
    return model


def ids(batch: int = 2, length: int = 20, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


STANDALONE = BLOCK_LINEARIZE + textwrap.dedent("""
    import json
    import torch
    from transformers import AutoModelForCausalLM
    export, ids_file, out_file, new_tokens = sys.argv[1:]
    model, info = AutoModelForCausalLM.from_pretrained(export, output_loading_info=True)
    model.eval()
    ids = torch.load(ids_file)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        greedy = dict(max_new_tokens=int(new_tokens), do_sample=False, pad_token_id=0)
        cached = model.generate(ids, use_cache=True, **greedy)
        uncached = model.generate(ids, use_cache=False, **greedy)
        # left padding: row 1 is row 0's last 12 tokens after 8 pads
        short = ids[:1, 8:]
        padded = torch.cat([ids[:1], torch.cat([torch.zeros(1, 8, dtype=ids.dtype), short], 1)])
        mask = torch.cat([torch.ones(1, ids.shape[1]), torch.cat([torch.zeros(1, 8), torch.ones(1, 12)], 1)]).long()
        batch = model(padded, attention_mask=mask, use_cache=False).logits
        alone = model(short, use_cache=False).logits
        padded_gen = model.generate(padded, attention_mask=mask, **greedy)
        alone_gen = model.generate(short, **greedy)
    torch.save({"logits": logits, "cached": cached, "uncached": uncached, "batch": batch, "alone": alone,
                "padded_gen": padded_gen, "alone_gen": alone_gen, "class": type(model).__name__,
                "missing": list(info["missing_keys"]), "unexpected": list(info["unexpected_keys"])}, out_file)
""")


def standalone(tmp_path: Path, export: Path, tokens: torch.Tensor) -> dict:
    torch.save(tokens, tmp_path / "ids.pt")
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # -I: no PYTHONPATH, no cwd or script dir on sys.path, so the repo's linearize is out of reach.
    result = subprocess.run([sys.executable, "-I", str(script), str(export), str(tmp_path / "ids.pt"),
                             str(tmp_path / "result.pt"), str(NEW_TOKENS)], cwd=outside, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "result.pt")


@pytest.mark.slow  # ~80 s each on the shared 2-core box: transformers' pure-torch delta rule, 4 generations
@pytest.mark.parity
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_export_loads_without_linearize_and_matches(tmp_path, tiny_tokenizer, arch):
    model = native_student(arch)
    out = qwen3_5.save(model, AutoTokenizer.from_pretrained(tiny_tokenizer), tmp_path / "export", card="card")
    files = {p.name for p in out.rglob("*")}
    assert not any(name.endswith(".py") for name in files)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config
    assert config["architectures"] == ["Qwen3_5ForCausalLM"] and config["model_type"] == "qwen3_5_text"
    assert config["layer_types"] == ["linear_attention", "full_attention", "linear_attention"]
    assert config["attention_bias"] == (arch == "llama")  # the widened map needs the q/k biases
    tokens = ids()
    got = standalone(tmp_path, out, tokens)
    assert got["class"] == "Qwen3_5ForCausalLM"
    assert got["missing"] == [] and got["unexpected"] == []
    with torch.no_grad():
        want = model(tokens, use_cache=False).logits
    assert 5 < want.abs().max() < 30  # the scale the tolerance is stated at
    assert (got["logits"] - want).abs().max() <= LOGIT_ATOL
    assert torch.equal(got["cached"], got["uncached"])
    # each left-padded row gives its unpadded result (logits at the real tokens, and greedy tokens)
    assert (got["batch"][1, 8:] - got["alone"][0]).abs().max() <= LOGIT_ATOL
    assert (got["batch"][0] - got["logits"][0]).abs().max() <= LOGIT_ATOL
    assert torch.equal(got["padded_gen"][1, 20:], got["alone_gen"][0, 12:])


def test_native_layer_decodes_from_its_conv_and_delta_state():
    """Prefill then one token at a time equals the full forward; the state is (conv prefix, delta state)."""
    model = native_student("llama")
    tokens = ids(1, 30)
    with torch.no_grad():
        full = model(tokens, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(tokens[:, :13], past_key_values=cache, use_cache=True).logits]
        steps += [model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(13, 30)]
    assert (torch.cat(steps, 1) - full).abs().max() <= DECODE_TOL * full.abs().max()
    prefix, delta = cache.layers[0].state
    assert prefix.shape == (1, 3, (4 + 2 * 2) * 16)  # [B, kernel − 1, (H + 2·H_kv)·D]
    assert delta.shape == (1, 2, 16, 16)  # [B, H_kv, D, D]: the export repeats it per query head (G = 2)


def test_native_start_is_near_todays_gated_delta():
    """With the conv at c·[0,0,0,1] and the same β, decay and output scale, the native layer's output is
    within O(c·|u|) of today's gated_delta: silu(c·u) ≈ c·u/2 and the L2 / RMS norms remove c/2."""
    outs = {}
    for native in (None, "qwen3_5"):
        model = tiny_model("llama", num_hidden_layers=LAYERS)
        linearize.linearize_model(model, AttentionConfig(mechanism="gated_delta", native_family=native,
                                                         chunk_size=16, init="zero_gate", softmax_layers=SOFTMAX))
        bind_native_students(model)
        mech = model.model.layers[0].self_attn.mechanism
        captured = []
        hook = mech.register_forward_hook(lambda m, i, o: captured.append(m.delta_branch(i[0], None, i[2], False)[0]))
        with torch.no_grad():
            model(ids(1, 40), use_cache=False)
        hook.remove()
        outs[native] = captured[0]
    relative = (outs["qwen3_5"] - outs[None]).norm() / outs[None].norm()
    # q/k: O(c·|u|) with c = 0.1; v (tap 0.25): silu(v/4) ≈ v/8 puts the tiny model's small outputs near the
    # output norm's eps (0.20 measured; 0.12 at tap 1, which measured 3.5x worse on SmolLM2: docs/export.md)
    assert relative < 0.25


def test_calibration_fits_the_biases_into_the_weights():
    """β and the gate have no bias in the family: calibration fits x·u ≈ 1 and puts the constants along u."""
    model = tiny_model("llama", num_hidden_layers=LAYERS)
    linearize.linearize_model(model, AttentionConfig(mechanism="gated_delta", native_family="qwen3_5",
                                                     chunk_size=16, softmax_layers=SOFTMAX, calibration_tokens=64))
    bind_native_students(model)
    with linearize.calibrating(model) as records:
        model(ids(2, 64), use_cache=False)
    mech = model.model.layers[0].self_attn.mechanism
    assert isinstance(mech, Qwen35GatedDelta) and mech.beta_proj.bias is None and mech.out_gate.bias is None
    assert mech.beta_proj.weight.abs().sum() > 0 and mech.out_gate.weight.abs().sum() > 0
    # u = 0 would give RMS 1; the tiny model's random, zero-mean inputs hold no constant direction (a real
    # model's do), so only "better than nothing" is asserted
    assert records[0]["constant_fit_rms"] < 0.9


@pytest.mark.parametrize("mechanism,options", [("kda", {}), ("gated_delta", {"delta_rope": True}),
                                               ("gated_delta", {"decay_from": "key"})])
def test_what_the_family_cannot_express_is_refused(mechanism, options):
    model = tiny_model("llama")
    cfg = AttentionConfig(mechanism=mechanism, native_family="qwen3_5", **options)
    with pytest.raises(UserError, match=mechanism if mechanism == "kda" else next(iter(options))):
        linearize.linearize_model(model, cfg)


def test_export_refuses_a_non_native_student_and_writes_nothing(tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    linearize.linearize_model(model, AttentionConfig(mechanism="window_linear", softmax_layers=[1]))
    with pytest.raises(UserError, match="window_linear"):
        qwen3_5.save(model, AutoTokenizer.from_pretrained(tiny_tokenizer), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_student_without_softmax_layers(tmp_path, tiny_tokenizer):
    model = native_student("qwen3", softmax_layers=[])
    with pytest.raises(UserError, match="full-attention"):
        qwen3_5.save(model, AutoTokenizer.from_pretrained(tiny_tokenizer), tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_widened_head_keeps_the_rotary_width_exact():
    for head_dim in (16, 64, 80, 128):
        extra = qwen3_5.widened_channels(head_dim)
        assert int((head_dim + extra) * (head_dim / (head_dim + extra))) == head_dim


@pytest.mark.slow  # ~60 s on the shared box: a fresh interpreter importing torch and transformers
def test_cli_refuses_a_window_linear_run_in_one_line_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("attention:\n  mechanism: window_linear\n")
    result = subprocess.run([sys.executable, "-m", "linearize", "export", str(run), str(tmp_path / "out"),
                             "--format", "qwen3_5"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "window_linear" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
