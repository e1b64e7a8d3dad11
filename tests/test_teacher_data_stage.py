"""A run whose training data includes the teacher's own samples (`data.mix` with `source: teacher`): the
pipeline makes them once, by the plain teacher, before the first stage, under `<run>/teacher_samples/`;
every stage reads the same rows, and a stage never generates."""
from __future__ import annotations

import contextlib
import io

import pytest

from test_stages import tiny_run_config


def _config(root, tiny_tokenizer, **data):
    cfg = tiny_run_config(root, tiny_tokenizer)
    mix = [{"source": "teacher", "weight": 0.5}, {"source": cfg.data.train, "weight": 0.5}]
    return tiny_run_config(root, tiny_tokenizer, data={
        "mix": mix, "teacher_samples": {"prompts": cfg.data.train, "tokens": 96, "max_new_tokens": 12,
                                        "batch_size": 4, "chat": "off"}, **data})


def test_the_pipeline_makes_teacher_samples_once_and_the_stages_read_them(tmp_path, tiny_tokenizer):
    from stages.pipeline import run_stages
    from stages.teacher_data import run_datasets, samples_dir

    cfg = _config(tmp_path, tiny_tokenizer)
    with contextlib.redirect_stdout(io.StringIO()):
        results = run_stages(cfg, ["attention_transfer", "lora_recovery"])
    run_dir = tmp_path / "runs" / "tiny"
    shards = sorted(p.name for p in samples_dir(run_dir).iterdir() if p.suffix == ".safetensors")
    assert shards and results["lora_recovery"]["step"] == cfg.lora_recovery.max_steps
    before = {p: p.stat().st_mtime_ns for p in samples_dir(run_dir).iterdir()}
    from linearize.train.student import load_converted

    model, tokenizer = load_converted(cfg)
    train, _ = run_datasets(cfg, tokenizer, run_dir, model)  # reads, never writes
    assert {p: p.stat().st_mtime_ns for p in samples_dir(run_dir).iterdir()} == before
    assert len(train) > 0


def test_a_stage_never_generates_missing_samples(tmp_path, tiny_tokenizer):
    """Reading with samples missing is one line saying to run the pipeline, not a student writing data."""
    from linearize.errors import UserError
    from linearize.train.student import load_converted
    from stages.teacher_data import run_datasets

    cfg = _config(tmp_path, tiny_tokenizer)
    model, tokenizer = load_converted(cfg)
    with pytest.raises(UserError, match="teacher samples in .* are incomplete"):
        run_datasets(cfg, tokenizer, tmp_path / "runs" / "tiny", model)


def test_complete_samples_are_read_without_loading_the_teacher(tmp_path, tiny_tokenizer, monkeypatch):
    """Before every later stage (and on resume) the pipeline only reads the stored samples: the teacher's
    weights are loaded only while samples are missing."""
    import stages.teacher_data as teacher_data

    cfg = _config(tmp_path, tiny_tokenizer)
    run_dir = tmp_path / "runs" / "tiny"
    loads = []
    real = teacher_data.load_teacher
    monkeypatch.setattr(teacher_data, "load_teacher", lambda model_cfg: loads.append(1) or real(model_cfg))
    with contextlib.redirect_stdout(io.StringIO()):
        teacher_data.ensure_teacher_samples(cfg, run_dir)
        teacher_data.ensure_teacher_samples(cfg, run_dir)
    assert loads == [1]
