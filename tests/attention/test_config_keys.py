"""Each mechanism declares the AttentionConfig keys it reads (`linearize.mechanism_config_keys`): the
declaration is exactly what building the mechanism and running it reads."""
import dataclasses

import pytest
import torch

import linearize
from attn_helpers import MECHANISMS, attention_config
from linearize.attention import COMMON_CONFIG_KEYS, Projected, RunOptions, build_mechanism
from linearize.config import AttentionConfig

FIELDS = {f.name for f in dataclasses.fields(AttentionConfig)}
BATCH, TOKENS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 1, 5, 4, 2, 16, 64


class RecordingConfig(AttentionConfig):
    """An AttentionConfig that notes every field read after construction."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        object.__setattr__(self, "read", set())

    def __getattribute__(self, name):
        if name in FIELDS:
            object.__getattribute__(self, "read").add(name)
        return object.__getattribute__(self, name)


def projected() -> Projected:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, TOKENS, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(BATCH, TOKENS, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    return Projected(q, k, v, q, k, k, torch.randn(BATCH, TOKENS, HIDDEN, generator=gen))


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_declared_keys_are_the_keys_read(mechanism):
    cfg = RecordingConfig(**dataclasses.asdict(attention_config(mechanism)))
    module = build_mechanism(cfg, HEADS, KV_HEADS, HEAD_DIM, HIDDEN)
    module(projected(), None, RunOptions(), want_state=True)
    declared = linearize.mechanism_config_keys()[mechanism]
    assert cfg.read - {"mechanism"} == set(declared) - set(COMMON_CONFIG_KEYS)


def test_every_key_is_common_or_read_by_a_mechanism():
    keys = linearize.mechanism_config_keys()
    assert set(keys) == set(linearize.available_mechanisms())
    assert all(key in FIELDS for declared in keys.values() for key in declared)
    assert set().union(*keys.values()) == FIELDS
    assert keys["softmax"] == COMMON_CONFIG_KEYS
