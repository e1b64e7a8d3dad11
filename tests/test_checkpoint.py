"""Checkpoints: manifest verification (corrupt / truncated / missing files refused by name), config
change refusal naming the keys, accept_changes, partial-save cleanup."""
from __future__ import annotations

import dataclasses

import pytest

from linearize.config.schema import RunConfig, TransferConfig
from linearize.errors import UserError
from linearize.train import changed_keys, config_to_dict, latest_checkpoint, stage_view, verify_checkpoint
from test_train import read_metrics, tiny_job, tiny_stage_cfg

EXPECTED_FILES = {"trainable.safetensors", "optimizer.safetensors", "scheduler.json", "rng.safetensors",
                  "state.json", "data.json", "config.json", "manifest.json"}


@pytest.fixture
def finished(tmp_path):
    tiny_job(tmp_path, tiny_stage_cfg(max_steps=2, save_every=1, eval_every=0))
    return tmp_path


def test_checkpoint_holds_every_piece_of_state(finished):
    ckpt = latest_checkpoint(finished)
    assert ckpt.name == "step_2" and {p.name for p in ckpt.iterdir()} == EXPECTED_FILES
    manifest = verify_checkpoint(ckpt)
    assert manifest["files"].keys() == EXPECTED_FILES - {"manifest.json"}


def test_corrupt_checkpoint_is_refused_by_name(finished):
    weights = latest_checkpoint(finished) / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"step_2 is corrupt: trainable.safetensors does not match its sha256"):
        tiny_job(finished, tiny_stage_cfg(max_steps=4, save_every=1, eval_every=0))


def test_truncated_and_missing_files_are_refused(finished):
    ckpt = latest_checkpoint(finished)
    optimizer = ckpt / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    with pytest.raises(UserError, match="optimizer.safetensors does not match"):
        verify_checkpoint(ckpt)
    (ckpt / "rng.safetensors").unlink()
    with pytest.raises(UserError, match="step_2 is corrupt: rng.safetensors is missing"):
        verify_checkpoint(ckpt)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(UserError, match="unreadable manifest.json"):
        verify_checkpoint(ckpt)


def test_changed_config_is_refused_naming_keys_unless_accepted(finished):
    cfg = RunConfig()
    changed = dataclasses.replace(cfg, attention_transfer=TransferConfig(lr=0.5, mse_factor=1.0))
    more_steps = tiny_stage_cfg(max_steps=3, save_every=1, eval_every=0)
    with pytest.raises(UserError, match=r"attention_transfer.lr, attention_transfer.mse_factor"):
        tiny_job(finished, more_steps, config=config_to_dict(changed))
    result = tiny_job(finished, more_steps, config=config_to_dict(changed), accept_changes=True)
    assert result.resumed_from == 2 and result.step == 3
    assert [r["step"] for r in read_metrics(finished)] == [1, 2, 3]


def test_other_stages_sections_and_run_name_do_not_count():
    base = config_to_dict(RunConfig())
    other = config_to_dict(dataclasses.replace(RunConfig(), run_name="x", seed=5))
    other["lora_recovery"]["lr"] = 1.0
    assert changed_keys(stage_view(base, "attention_transfer"), stage_view(other, "attention_transfer")) == ["seed"]


def test_partial_save_is_cleaned_up(finished):
    leftover = finished / ".tmp-step_3-999"
    leftover.mkdir()
    (leftover / "trainable.safetensors").write_bytes(b"half")
    tiny_job(finished, tiny_stage_cfg(max_steps=3, save_every=1, eval_every=0))
    assert not leftover.exists() and latest_checkpoint(finished).name == "step_3"


def test_key_added_since_the_snapshot_counts_only_when_it_leaves_its_default(tmp_path):
    """A run saved before a key existed resumes under a newer linearize when the key keeps its default
    (the old behaviour); a non-default value of the new key is still a change."""
    from linearize.train.state import check_same_config

    current = config_to_dict(RunConfig())
    saved = config_to_dict(RunConfig())
    del saved["lora_recovery"]["ce_weight"]  # a snapshot from before the key was added
    assert check_same_config(saved, current, "lora_recovery", tmp_path, accept=False) == []
    current["lora_recovery"]["ce_weight"] = 0.5  # not the default
    with pytest.raises(UserError, match="lora_recovery.ce_weight"):
        check_same_config(saved, current, "lora_recovery", tmp_path, accept=False)
    current["lora_recovery"]["ce_weight"] = RunConfig().lora_recovery.ce_weight
    saved["lora_recovery"]["retired_key"] = 1  # a key the schema no longer has still counts
    assert check_same_config(saved, current, "lora_recovery", tmp_path, accept=True) == ["lora_recovery.retired_key"]
