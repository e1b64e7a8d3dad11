"""data.mix: rows drawn from sources in proportion to their weights, deterministic by seed, part of the data
fingerprint, and one-line errors for bad entries."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from linearize import UserError
from linearize.config.schema import DataConfig
from linearize.data import build_datasets, mix_counts
from linearize.train.checkpoint import data_fingerprint

SEQ_LEN = 8


@pytest.fixture
def sources(tmp_path, tiny_tokenizer):
    """Two text files whose rows are told apart by their first token: 'a...' lines vs 'z...' lines."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    (tmp_path / "a.txt").write_text("\n".join(["aaaa aaaa aaaa aaaa"] * 120))
    (tmp_path / "z.txt").write_text("\n".join(["zzzz zzzz zzzz zzzz"] * 120))
    return tok, str(tmp_path / "a.txt"), str(tmp_path / "z.txt")


def _cfg(a, z, wa, wz, **kw):
    return DataConfig(mix=[{"source": a, "weight": wa}, {"source": z, "weight": wz}], eval="", eval_fraction=0.1,
                      seq_len=SEQ_LEN, **kw)


def _share_a(rows: torch.Tensor, tok) -> float:
    a_ids = set(tok("aaaa aaaa", add_special_tokens=False)["input_ids"])
    z_ids = set(tok("zzzz zzzz", add_special_tokens=False)["input_ids"])
    a_only, z_only = a_ids - z_ids, z_ids - a_ids  # the space token is in both
    is_a = [bool(set(r.tolist()) & a_only) and not set(r.tolist()) & z_only for r in rows]
    return sum(is_a) / len(is_a)


def test_counts_are_the_largest_unrepeated_mix_split_by_weight():
    assert mix_counts([100, 100], [3, 1]) == [100, 33]  # source 0 limits: 100 / 0.75 = 133 rows in all
    assert mix_counts([10, 1000], [1, 1]) == [10, 10]
    # Rows in all: min(50 / (1/6), 70 / (1/3), 90 / (1/2)) = min(300, 210, 180) = 180.
    assert mix_counts([50, 70, 90], [1, 2, 3]) == [30, 60, 90]
    assert mix_counts([7, 7, 7], [1, 1, 1]) == [7, 7, 7]


def test_proportions_hold_and_order_is_deterministic(sources):
    tok, a, z = sources
    train, held_out = build_datasets(_cfg(a, z, 0.7, 0.3), tok, seed=0)
    rows = torch.cat([train, held_out])
    # Exact to one row (largest-remainder rounding), and the 10% held-out split draws from both sources.
    assert abs(_share_a(rows, tok) - 0.7) <= 1 / rows.shape[0]
    # The first 40 training rows: a random sample (hypergeometric); 0.25 is > 3 standard deviations
    # (sd = sqrt(0.7·0.3/40) ≈ 0.072), so a correct mix fails this about once in a thousand seeds.
    assert abs(_share_a(train[:40], tok) - 0.7) < 0.25
    again, _ = build_datasets(_cfg(a, z, 0.7, 0.3), tok, seed=0)
    other, _ = build_datasets(_cfg(a, z, 0.7, 0.3), tok, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_the_fingerprint_changes_with_the_weights(sources):
    tok, a, z = sources
    base = data_fingerprint(*build_datasets(_cfg(a, z, 0.7, 0.3), tok, seed=0))
    assert data_fingerprint(*build_datasets(_cfg(a, z, 0.7, 0.3), tok, seed=0)) == base
    assert data_fingerprint(*build_datasets(_cfg(a, z, 0.5, 0.5), tok, seed=0)) != base


def test_entries_may_be_objects_with_source_and_weight(sources):
    tok, a, z = sources
    as_dicts = build_datasets(_cfg(a, z, 2, 1), tok, seed=0)[0]
    objects = [SimpleNamespace(source=a, weight=2), SimpleNamespace(source=z, weight=1)]
    as_objects = build_datasets(dataclasses.replace(_cfg(a, z, 2, 1), mix=objects), tok, seed=0)[0]
    assert torch.equal(as_dicts, as_objects)


@pytest.mark.parametrize("mix, expected", [
    ([], "empty"),
    ([{"source": "demo-news", "weight": 0}], "weight must be"),
    ([{"source": "demo-news", "weight": -1.0}], "weight must be"),
    ([{"source": "demo-news"}], "needs 'weight'"),
    ([{"source": "no such thing!", "weight": 1}], "unknown source .*teacher, recall, a registered corpus"),
    ([{"source": "wikipedia", "weight": 1}], "unknown source .*hub datasets are off"),  # conftest: offline
    ([{"source": "missing.txt", "weight": 1}], "not found"),
    ([{"source": "demo-news", "weight": 1}, {"source": "demo-news", "weight": 2}], "twice"),
])
def test_bad_mixes_are_one_line_errors(tiny_tokenizer, mix, expected):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    with pytest.raises(UserError, match=expected) as info:
        build_datasets(DataConfig(mix=mix, seq_len=SEQ_LEN), tok, seed=0)
    assert "\n" not in str(info.value)


def test_an_unknown_data_train_lists_the_valid_kinds(tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    with pytest.raises(UserError, match=r"data.train: unknown source 'no such thing!'; valid kinds: teacher, recall"):
        build_datasets(DataConfig(train="no such thing!", seq_len=SEQ_LEN), tok, seed=0)
