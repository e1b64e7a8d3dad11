"""Exports as Hugging Face models: `load_export`, the registered Auto classes, and a standalone load
with plain transformers in a subprocess where linearize cannot be imported; cached generation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import linearize
from linearize.config import AttentionConfig
from linearize.models import bundle
from linearize.models.exported import load_export, save_export
from linearize.models.standalone import BLOCK_LINEARIZE

from conftest import tiny_model
from test_stages import DELTA_MECHANISMS

# The export stores fp32 weights and every path recomputes the same ops: only float reordering differs.
ATOL = 1e-5
PROMPT_LEN = 12
NEW_TOKENS = 6
NUDGE = 0.05  # noise on the converted layers' own parameters: well off their init, far from unstable


def _nudge_student_parameters(model, seed: int = 0) -> None:
    """Moves every parameter the conversion added (feature maps, gates, decays) off its deterministic init:
    an export that dropped or re-initialized one of them would otherwise still match the original."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mechanism." in name:
                param.add_(NUDGE * torch.randn(param.shape, generator=gen))


def _export(tmp_path: Path, tokenizer_dir, arch: str = "llama", mechanism: str = "linear", **attention):
    from transformers import AutoTokenizer

    model = tiny_model(arch)
    linearize.linearize_model(model, AttentionConfig(mechanism=mechanism, **attention))
    _nudge_student_parameters(model)
    out = save_export(model, AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path / "export")
    return model, out


def _ids(batch: int = 2, length: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


# The delta-rule students with a softmax layer kept (layer 1 of 2): a mixed cache in every decode test. A
# window of 4 < the prompts makes gated_delta_window use both its halves; the others do not read it.
DELTA_CASES = [("llama", mechanism, {"softmax_layers": [1], "window_size": 4}) for mechanism in DELTA_MECHANISMS]
CASES = [("llama", "linear", {}), ("llama", "window_linear", {"window_size": 4}),
         ("llama", "window_linear", {"window_size": 4, "sink_tokens": 2, "linear_half_life": 3.0}),
         # a learned half-life: one per head, nudged apart like every student parameter
         ("llama", "window_linear", {"window_size": 4, "linear_half_life": 3.0, "linear_half_life_learned": True}),
         ("qwen3", "liger", {"feature_map": "softmax_dim"}), ("mistral", "lawcat", {}),
         ("qwen2", "linear", {"softmax_layers": [1]}), *DELTA_CASES]


@pytest.mark.parity
@pytest.mark.parametrize("arch,mechanism,attention", CASES)
def test_load_export_and_auto_classes_give_the_original_logits(tmp_path, tiny_tokenizer, arch, mechanism, attention):
    from transformers import AutoModelForCausalLM

    model, out = _export(tmp_path, tiny_tokenizer, arch, mechanism, **attention)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"linearize_{arch}"
    assert config["auto_map"]["AutoModelForCausalLM"].startswith(bundle.MODELING_MODULE + ".")
    ids = _ids()
    loaded, _ = load_export(out)
    auto = AutoModelForCausalLM.from_pretrained(out).eval()  # registered by load_export (register_auto_classes)
    with torch.no_grad():
        want = model(ids).logits
        for got in (loaded(ids).logits, auto(ids).logits):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert loaded.config.linearize["layers"] == model.config.linearize["layers"]


def test_a_loaded_export_exports_again(tmp_path, tiny_tokenizer):
    model, out = _export(tmp_path, tiny_tokenizer, "qwen3", "lawcat")
    loaded, tokenizer = load_export(out)
    again, _ = load_export(save_export(loaded, tokenizer, tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "linearize_qwen3"
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=ATOL, rtol=0)


def test_bundle_has_only_flat_relative_linearize_imports(tmp_path):
    files = bundle.write_bundle(tmp_path)
    assert bundle.MODELING_FILE in files
    for name in files:
        text = (tmp_path / name).read_text()
        for line in text.splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("from linearize", "import linearize", "from ..")), (name, line)
            if stripped.startswith("from ."):
                target = stripped.split()[1][1:]
                assert f"{target}.py" in files, (name, line)


STANDALONE = BLOCK_LINEARIZE + textwrap.dedent("""
    import torch
    from transformers import AutoModelForCausalLM
    export, ids_file, out_file = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    ids = torch.load(ids_file)
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens={new}, do_sample=False, pad_token_id=0)
    # The CUDA-only Triton hookup, exercised on CPU: the ops must find the bundled kernels by their names.
    modeling = sys.modules[type(model).__module__]
    kernel = sys.modules[modeling.__package__ + ".lz_ops_linear_attn"].load_triton()
    torch.save({{"logits": logits, "generated": generated, "module": type(model).__module__,
                 "kernel": kernel.__module__}}, out_file)
""").format(new=NEW_TOKENS)


@pytest.mark.parity
def test_standalone_load_without_linearize(tmp_path, tiny_tokenizer):
    _, out = _export(tmp_path, tiny_tokenizer, "llama", "window_linear", window_size=4)
    ids = _ids()
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    # -I: no PYTHONPATH, no cwd or script dir on sys.path, so the repo's linearize is out of reach.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run([sys.executable, "-I", str(script), str(out), str(tmp_path / "ids.pt"),
                             str(tmp_path / "result.pt")], cwd=outside, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "result.pt")
    assert got["module"].startswith("transformers_modules.")
    assert got["kernel"].endswith(".lz_ops_linear_attn_triton")
    loaded, _ = load_export(out)
    with torch.no_grad():
        want_logits = loaded(ids).logits
        want_generated = loaded.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got["logits"], want_logits, atol=ATOL, rtol=0)
    assert torch.equal(got["generated"], want_generated)


GENERATION_CASES = [("llama", "linear", {}), ("qwen2", "window_linear", {"window_size": 4, "softmax_layers": [1]}),
                    ("mistral", "lawcat", {}), *DELTA_CASES,
                    ("llama", "window_linear", {"window_size": 4, "linear_half_life": 3.0}),
                    ("llama", "window_linear", {"window_size": 4, "linear_half_life": 3.0, "linear_half_life_learned": True})]


@pytest.mark.parity
@pytest.mark.parametrize("arch,mechanism,attention", GENERATION_CASES)
def test_cached_generation_logits_equal_a_full_forward(tmp_path, tiny_tokenizer, arch, mechanism, attention):
    _, out = _export(tmp_path, tiny_tokenizer, arch, mechanism, **attention)
    model, _ = load_export(out)
    ids = _ids()
    with torch.no_grad():
        result = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                output_logits=True, return_dict_in_generate=True)
        full = model(result.sequences).logits  # [B, T + new, V]
    for step, logits in enumerate(result.logits):
        torch.testing.assert_close(logits, full[:, PROMPT_LEN - 1 + step], atol=ATOL, rtol=0)


@pytest.mark.parity
@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(do_sample=True, top_k=20),
                                  dict(do_sample=False, num_beams=3, num_return_sequences=2)])
@pytest.mark.parametrize("arch,mechanism,attention", [("llama", "window_linear", {"window_size": 4}), *DELTA_CASES])
def test_greedy_sampling_and_beams_equal_uncached_generation(tmp_path, tiny_tokenizer, mode, arch, mechanism,
                                                             attention):
    _, out = _export(tmp_path, tiny_tokenizer, arch, mechanism, **attention)
    model, _ = load_export(out)
    ids = _ids()
    sequences = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        with torch.no_grad():
            sequences.append(model.generate(ids, max_new_tokens=NEW_TOKENS, pad_token_id=0, use_cache=use_cache, **mode))
    assert torch.equal(*sequences)


def _greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The oracle: one full forward per new token on the unpadded row `[1, T]`."""
    for _ in range(steps):
        next_token = model(ids).logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        ids = torch.cat([ids, next_token], dim=1)
    return ids


@pytest.mark.parity
@pytest.mark.parametrize("arch,mechanism,attention", [*GENERATION_CASES[:2], *DELTA_CASES])
def test_left_padded_batch_generation_is_exact(tmp_path, tiny_tokenizer, arch, mechanism, attention):
    _, out = _export(tmp_path, tiny_tokenizer, arch, mechanism, **attention)
    model, _ = load_export(out)
    pad = 0
    lengths = [PROMPT_LEN, PROMPT_LEN - 5]
    rows = [_ids(1, n, seed=i + 3)[0] for i, n in enumerate(lengths)]
    ids = torch.full((len(rows), PROMPT_LEN), pad)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, PROMPT_LEN - len(row):], mask[i, PROMPT_LEN - len(row):] = row, 1
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=pad)
        for i, row in enumerate(rows):
            want = _greedy_without_cache(model, row[None], NEW_TOKENS)[0]
            assert torch.equal(got[i, PROMPT_LEN - len(row):], want)
            assert bool((got[i, :PROMPT_LEN - len(row)] == pad).all())
        by_total_length = model.generate(input_ids=ids, attention_mask=mask, max_length=PROMPT_LEN + NEW_TOKENS,
                                         do_sample=False, pad_token_id=pad)
        assert torch.equal(by_total_length, got)
        beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, num_beams=2,
                               num_return_sequences=2, pad_token_id=pad)
    assert beams.shape == (2 * len(rows), PROMPT_LEN + NEW_TOKENS)
