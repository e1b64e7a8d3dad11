"""Long-context evaluation: passkey prompts and scoring, perplexity by position, and the evaluate
stage's `long_context` section (tables, heatmap)."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

import linearize
from linearize.config import AttentionConfig
from linearize.evals import passkey, perplexity_by_position, run_long_context
from linearize.evals.position_ppl import bucket_edges
from linearize.evals.report import long_context_markdown
from linearize.train.evaluation import compare_on_tokens

from conftest import tiny_model

KEY = 48213
LENGTH = 160


@pytest.fixture
def tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer)


@pytest.fixture
def student():
    model = tiny_model("llama")
    return linearize.linearize_model(model, AttentionConfig(mechanism="window_linear", window_size=8, feature_dim=8))


def _needle_start(tokenizer, ids: torch.Tensor) -> int:
    """Character offset of the needle in the decoded prompt."""
    return tokenizer.decode(ids).index(passkey.NEEDLE.format(key=KEY).split(".")[0])


def test_passkey_prompt_has_the_length_and_the_needle_at_its_depth(tokenizer):
    starts = []
    for depth in (0.0, 0.5, 1.0):
        ids = passkey.passkey_prompt(tokenizer, LENGTH, depth, KEY)
        assert ids.shape == (LENGTH,)
        text = tokenizer.decode(ids)
        assert text.endswith(passkey.QUESTION) and str(KEY) in text
        starts.append(_needle_start(tokenizer, ids))
    assert starts[0] == 0 and starts[0] < starts[1] < starts[2]
    with pytest.raises(ValueError, match="too short"):
        passkey.passkey_prompt(tokenizer, 10, 0.5, KEY)
    with pytest.raises(ValueError, match="depth"):
        passkey.passkey_prompt(tokenizer, LENGTH, 1.5, KEY)


class _Reader(torch.nn.Module):
    """A stand-in model whose `generate` answers with the key found in the prompt, plus `offset`, cut to
    its first `keep` digits."""

    def __init__(self, tokenizer, offset: int, keep: int = passkey.KEY_DIGITS):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.offset, self.keep = tokenizer, offset, keep

    def generate(self, input_ids, max_new_tokens, **kwargs):
        rows = []
        for row in input_ids:
            key = int(re.search(r"\d+", self.tokenizer.decode(row)).group(0)) + self.offset
            answer = self.tokenizer(f" {str(key)[:self.keep]}.", add_special_tokens=False,
                                    return_tensors="pt").input_ids[0]
            rows.append(torch.cat([row, answer[:max_new_tokens]]))
        return torch.stack(rows)


@pytest.mark.parametrize("offset,accuracy", [(0, 1.0), (1, 0.0)])
def test_passkey_scores_exact_matches(tokenizer, offset, accuracy):
    result = passkey.passkey_retrieval(_Reader(tokenizer, offset), tokenizer, [LENGTH, 2 * LENGTH], [0.0, 1.0],
                                       trials=2)
    assert result["accuracy"] == [[accuracy, accuracy], [accuracy, accuracy]]
    assert result["mean_accuracy"] == accuracy
    if offset == 0:
        assert result["digit_accuracy"] == [[1.0, 1.0], [1.0, 1.0]] and result["mean_digit_accuracy"] == 1.0


def test_passkey_digit_accuracy_gives_partial_credit(tokenizer):
    assert passkey.digits_in_place("12395", "12345") == 0.8
    assert passkey.digits_in_place("", "12345") == 0.0
    # An answer with the key's first 3 digits: no exact match, 3 of 5 digits in place in every cell.
    result = passkey.passkey_retrieval(_Reader(tokenizer, 0, keep=3), tokenizer, [LENGTH], [0.0, 1.0], trials=2)
    assert result["mean_accuracy"] == 0.0
    assert result["digit_accuracy"] == [[0.6, 0.6]] and result["mean_digit_accuracy"] == pytest.approx(0.6)
    assert "digits in place: mean 0.60" in long_context_markdown({"passkey": result})


def test_position_buckets_recombine_to_the_overall_perplexity(student):
    tokens = torch.randint(0, 200, (2, 33), generator=torch.Generator().manual_seed(0))
    result = perplexity_by_position(student, tokens, buckets=4)
    assert [(b["start"], b["end"]) for b in result["buckets"]] == [(1, 9), (9, 17), (17, 25), (25, 33)]
    log_ppl = sum((b["end"] - b["start"]) * math.log(b["ppl"]) for b in result["buckets"]) / 32
    want = compare_on_tokens(student, tokens)["student_ppl"]
    # float64 sums of fp32 cross entropies, accumulated in a different order
    assert math.isclose(math.exp(log_ppl), want, rel_tol=1e-5)
    with pytest.raises(ValueError, match="buckets"):
        bucket_edges(4, 8)


def test_run_long_context_writes_json_tables_and_heatmap(tmp_path, student, tokenizer):
    from linearize.config.schema import LongContextConfig

    cfg = LongContextConfig(passkey_lengths=[128, 160], passkey_depths=[0.0, 0.5, 1.0], passkey_trials=1,
                            position_buckets=2)
    tokens = torch.randint(0, 200, (1, 17), generator=torch.Generator().manual_seed(1))
    result = run_long_context(cfg, student, tokenizer, tokens, tmp_path)
    grid = result["passkey"]["accuracy"]
    assert len(grid) == 2 and all(len(row) == 3 and all(0.0 <= a <= 1.0 for a in row) for row in grid)
    assert len(result["position_ppl"]["buckets"]) == 2
    assert (tmp_path / "passkey.png").stat().st_size > 0
    table = (tmp_path / "long_context.md").read_text()
    assert "| 160 |" in table and "Perplexity by position" in table
    assert json.loads((tmp_path / "long_context.json").read_text())["passkey"]["lengths"] == [128, 160]


def test_evaluate_stage_adds_long_context_only_when_asked(tmp_path, student, tokenizer):
    from stages.config_loader import config_from_dict
    from stages.evaluate import evaluate_model

    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("\n".join(["The quick brown fox jumps over the lazy dog."] * 40))
    base = {"data": {"eval": str(eval_file)}, "evaluate": {"max_sequences": 1, "sample_tokens": 2}}
    off = evaluate_model(config_from_dict(base, "test"), student, tokenizer, with_teacher=False, out_dir=tmp_path)
    assert "long_context" not in off
    on_cfg = config_from_dict(base, "test", ["evaluate.long_context.passkey_lengths=[128]",
                                             "evaluate.long_context.passkey_trials=1",
                                             "evaluate.long_context.position_seq_len=64"])
    on = evaluate_model(on_cfg, student, tokenizer, with_teacher=True, out_dir=tmp_path)
    assert on["long_context"]["passkey"]["lengths"] == [128]
    assert on["long_context"]["position_ppl"]["seq_len"] == 64
    student_ppl = [b["ppl"] for b in on["long_context"]["position_ppl"]["buckets"]]
    teacher_ppl = [b["ppl"] for b in on["long_context_teacher"]["position_ppl"]["buckets"]]
    assert student_ppl != teacher_ppl  # the teacher view really ran softmax attention
    assert (tmp_path / "teacher" / "passkey.png").is_file()


def test_the_heatmap_leaves_matplotlibs_backend_alone(tmp_path):
    """The heatmap draws on its own Agg canvas: a caller's backend (here svg) is still set afterwards."""
    import matplotlib

    from linearize.evals import plot_passkey_heatmap

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        grid = {"lengths": [64, 128], "depths": [0.0, 0.5], "accuracy": [[1.0, 0.5], [0.0, 1.0]]}
        path = plot_passkey_heatmap(grid, tmp_path / "passkey.png")
        assert matplotlib.get_backend() == "svg"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)
