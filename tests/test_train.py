"""The training loop on a tiny llama: metrics, plots, schedules, eval, NaN stop, engine seam.

`tiny_job` is shared with test_checkpoint.py and test_resume.py (which runs it in a subprocess)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from linearize.config.schema import EngineConfig, RunConfig, TransferConfig
from linearize.errors import UserError
from linearize.train import (METRICS_FILE, build_schedule, config_to_dict, latest_checkpoint, train,
                             verify_checkpoint)
from linearize.train.sampler import sample_indices

SEQ_LEN = 16
NUM_TRAIN, NUM_EVAL = 12, 4


def tiny_tokens(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (NUM_TRAIN, SEQ_LEN), generator=g),  # [N, L]
            torch.randint(0, 256, (NUM_EVAL, SEQ_LEN), generator=g))  # [M, L]


def lm_loss(model, input_ids):
    return model(input_ids=input_ids, labels=input_ids).loss


def tiny_stage_cfg(**overrides) -> TransferConfig:
    base = dict(max_steps=6, save_every=2, eval_every=3, keep_last=2, lr=1e-2, scheduler="cosine",
                warmup_steps=2, min_lr=1e-4, micro_batch_size=2, grad_accum=2, grad_clip=1.0)
    base.update(overrides)
    return TransferConfig(**base)


def tiny_job(stage_dir, stage_cfg=None, config=None, loss_fn=lm_loss, accept_changes=False, dropout=0.1,
             data_seed=0, **model_overrides):
    """A tiny llama (with attention dropout, so RNG restore matters) training its last layer + head.
    `data_seed` picks other token streams; `model_overrides` change the tiny model's config."""
    torch.manual_seed(0)
    model = tiny_model("llama", attention_dropout=dropout, **model_overrides)
    model.requires_grad_(False)
    for module in (model.model.layers[-1], model.lm_head):
        module.requires_grad_(True)
    train_tokens, eval_tokens = tiny_tokens(data_seed)
    return train(model, loss_fn, train_tokens, eval_tokens, stage_cfg or tiny_stage_cfg(),
                 stage_dir=Path(stage_dir), stage="attention_transfer", seed=0, engine_cfg=EngineConfig(),
                 config=config or config_to_dict(RunConfig()), accept_changes=accept_changes)


def read_metrics(stage_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(stage_dir) / METRICS_FILE).read_text().splitlines()]


def test_loop_writes_metrics_plot_and_checkpoints(tmp_path):
    result = tiny_job(tmp_path)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= records[0].keys()
    assert records[-1]["tokens"] == 6 * 2 * 2 * SEQ_LEN  # steps × accum × micro-batch × length
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert result.plot.exists() and result.plot.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_4", "step_6"]  # keep_last=2
    verify_checkpoint(latest_checkpoint(tmp_path))


def test_only_trainable_params_change(tmp_path):
    before = tiny_model("llama", attention_dropout=0.1).state_dict()
    torch.manual_seed(0)
    result = tiny_job(tmp_path, tiny_stage_cfg(max_steps=2))
    from safetensors.torch import load_file

    saved = load_file(result.checkpoint / "trainable.safetensors")
    assert saved and all(n.startswith(("model.layers.1.", "lm_head")) for n in saved)
    assert any(not torch.equal(saved[n], before[n]) for n in saved)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def flaky_loss(model, input_ids):
        calls["n"] += model.training  # eval batches do not count
        loss = lm_loss(model, input_ids)
        return loss * math.nan if calls["n"] > 2 * 4 else loss  # micro-batches of steps 1..4 are fine

    with pytest.raises(UserError, match=r"loss is nan at step 5.*step_4"):
        tiny_job(tmp_path, loss_fn=flaky_loss)
    assert latest_checkpoint(tmp_path).name == "step_4"
    verify_checkpoint(latest_checkpoint(tmp_path))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_cosine_warmup_and_constant_schedules():
    cosine = build_schedule(tiny_stage_cfg(max_steps=10, warmup_steps=2, lr=1.0, min_lr=0.1))
    assert [cosine.lr(s) for s in (1, 2)] == [0.5, 1.0]
    assert cosine.lr(10) == pytest.approx(0.1)  # floating cos(pi)
    assert cosine.lr(6) == pytest.approx(0.55)  # halfway: mean of lr and min_lr
    constant = build_schedule(tiny_stage_cfg(scheduler="constant", warmup_steps=0, lr=0.3))
    assert constant.lr(1) == constant.lr(100) == 0.3


def test_plateau_schedule_reduces_after_patience_and_restores_state():
    cfg = tiny_stage_cfg(scheduler="plateau", warmup_steps=0, lr=1.0, min_lr=0.05, plateau_patience=2,
                         plateau_factor=0.1)
    sched = build_schedule(cfg)
    for loss in (1.0, 1.0, 1.0):
        sched.on_eval(loss)
    assert sched.lr(5) == 1.0  # two bad evals = patience, not yet beyond it
    sched.on_eval(1.0)
    assert sched.lr(5) == pytest.approx(0.1)
    other = build_schedule(cfg)
    other.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert other.lr(5) == sched.lr(5)
    for _ in range(6):
        sched.on_eval(1.0)
    assert sched.lr(5) == 0.05  # floored at min_lr


def test_unknown_scheduler_lists_valid_names():
    with pytest.raises(ValueError, match="constant, cosine, plateau"):
        build_schedule(tiny_stage_cfg(scheduler="linear"))


def test_sampler_is_a_function_of_seed_and_cursor():
    whole = sample_indices(0, 30, 12, seed=3)
    parts = torch.cat([sample_indices(c, 5, 12, seed=3) for c in range(0, 30, 5)])
    assert torch.equal(whole, parts)
    assert sorted(whole[:12].tolist()) == list(range(12))  # each epoch is a permutation
    assert not torch.equal(whole[:12], whole[12:24])  # epochs differ
    assert torch.equal(sample_indices(0, 12, 12, seed=0, shuffle=False), torch.arange(12))


@pytest.mark.parametrize("autocast", ["bfloat16"])
def test_autocast_runs_on_cpu(tmp_path, autocast):
    result = tiny_job(tmp_path, tiny_stage_cfg(max_steps=2, autocast=autocast))
    assert math.isfinite(result.loss)


def test_distributed_settings_are_read_once_and_passed_in(monkeypatch, tmp_path):
    """The launcher's variables become a frozen value; what takes that value ignores the environment."""
    import dataclasses

    from linearize.train.distributed import DistributedSettings, set_triton_cache_per_rank

    read = DistributedSettings.from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                         "TRITON_CACHE_DIR": str(tmp_path)})
    assert (read.rank, read.world_size, read.local_rank, read.is_main) == (2, 4, 1, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        read.rank = 0
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert set_triton_cache_per_rank(read) == tmp_path / "rank2"  # the value's rank and base, not the env's
