"""The `recall` source: answers are exact copies of earlier spans at the configured distances, sequences
are deterministic and held-out examples differ from training rows, and nothing of the passkey
evaluation's wording is reused."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

from linearize import UserError
from linearize.config.schema import RecallDataConfig
from linearize.data import recall
from linearize.evals import passkey

FILLER = ["The river ran past the old mill, and every autumn the farmers brought their grain to be ground. "
          "The miller kept a ledger of every sack and every coin. " * 6,
          "On the quay a grey cat watched the boats come in; the fishermen threw it the smallest fish. " * 6]
SEQ_LEN = 1024  # the test tokenizer spends about a token per character: a few items take ~300 tokens
KW = dict(filler=FILLER, queries=3, min_distance=40, max_distance=700)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return AutoTokenizer.from_pretrained(tiny_tokenizer)


def _spans(ids: torch.Tensor, positions: torch.Tensor) -> list[list[int]]:
    """Runs of consecutive answer positions: one per query."""
    runs, current = [], [positions[0].item()]
    for p in positions[1:].tolist():
        if p == current[-1] + 1:
            current.append(p)
        else:
            runs.append(current)
            current = [p]
    return runs + [current]


def _earlier(ids: list[int], span: list[int], before: int) -> list[int]:
    """Start positions where `span` occurs in ids[:before]."""
    n = len(span)
    return [i for i in range(before - n + 1) if ids[i:i + n] == span]


def test_every_answer_copies_an_earlier_span_within_the_distance_range(tok):
    examples = recall.recall_examples(tok, 6, SEQ_LEN, seed=0, **KW)
    queries = 0
    for ids, positions in examples:
        assert ids.shape == (SEQ_LEN,) and positions.numel() > 0
        assert positions.min() > 0 and positions.max() < SEQ_LEN
        seq = ids.tolist()
        for run in _spans(ids, positions):
            span = seq[run[0]:run[-1] + 1]
            starts = _earlier(seq, span, run[0])
            assert starts, "the answer does not occur earlier: not a copy task"
            distance = run[0] - starts[-1]
            assert KW["min_distance"] <= distance <= KW["max_distance"], distance
            queries += 1
    assert queries >= 2 * len(examples)  # several queries per sequence (some may not fit and are dropped)


def test_sequences_are_deterministic_and_held_out_differs_from_training(tok):
    first = recall.recall_examples(tok, 3, SEQ_LEN, seed=1, **KW)
    again = recall.recall_examples(tok, 3, SEQ_LEN, seed=1, **KW)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = recall.recall_examples(tok, 3, SEQ_LEN, seed=2, **KW)
    assert not torch.equal(first[0][0], other[0][0])
    cfg = RecallDataConfig(sequences=3, min_distance=40, max_distance=700, queries=3, seed=1)
    rows = recall.recall_rows(cfg, tok, SEQ_LEN, filler=FILLER)
    assert rows.shape == (3, SEQ_LEN) and torch.equal(rows, recall.recall_rows(cfg, tok, SEQ_LEN, filler=FILLER))
    held_out = torch.stack([ids for ids, _ in first])
    assert not any(torch.equal(r, h) for r in rows for h in held_out)


def test_the_passkey_template_is_not_reused(tok):
    text = " ".join(tok.decode(ids) for ids, _ in recall.recall_examples(tok, 8, SEQ_LEN, seed=3, **KW)).lower()
    for phrase in ("pass key", "passkey", "remember it", "what is the", "the grass is green", "the sky is blue"):
        assert phrase not in text
    templates = " ".join(f"{f.header} {f.item} {f.query}" for f in recall.FORMATS.values()).lower()
    for sentence in (passkey.FILLER + passkey.NEEDLE + passkey.QUESTION).lower().split(". "):
        assert sentence.strip(" .") not in templates


def test_bad_settings_are_one_line_errors(tok):
    cfg = RecallDataConfig(sequences=2, min_distance=40, max_distance=700, queries=3)
    cases = [(dict(queries=0), "queries"), (dict(min_distance=0), "min_distance"),
             (dict(max_distance=SEQ_LEN), "does not fit"), (dict(sequences=0), "sequences")]
    for change, expected in cases:
        with pytest.raises(UserError, match=expected):
            recall.recall_rows(dataclasses.replace(cfg, **change), tok, SEQ_LEN, filler=FILLER)
    with pytest.raises(UserError, match="no query fits"):
        recall.recall_examples(tok, 1, 128, seed=0, filler=FILLER, min_distance=8, max_distance=100)
