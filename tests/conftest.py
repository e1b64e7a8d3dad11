"""Shared fixtures: tiny random decoder models (2 layers, hidden 64, GQA) for every supported
architecture, and a byte-level BPE tokenizer trained locally, so nothing is downloaded."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3"]
TINY_VOCAB = 256


def tiny_config(arch: str, **overrides):
    """Config of a 2-layer, hidden-64 model with 4 query heads over 2 kv heads (GQA 2:1)."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="eager")
    return model.eval()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and two threads on a busy 2-core box ran up to 40x
    slower; tests that time nothing run on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture
def make_tiny_model():
    return tiny_model


TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Linear attention replaces the softmax with a kernel feature map.",
    "A sliding window keeps the most recent keys and values exactly.",
    "Pack the documents into sequences of fixed length, then shuffle them.",
] * 8


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 256-token byte-level BPE tokenizer trained on a few sentences, saved as a HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path
