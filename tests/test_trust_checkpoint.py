"""What a training checkpoint promises beyond exact resume: a crafted file never runs code, a malformed
or hostile manifest never reaches outside the checkpoint, a fault or a mismatch is a one-line
UserError (never a traceback), resuming onto other data is refused, a full disk loses nothing, and
metrics.jsonl holds one record per step."""
from __future__ import annotations

import errno
import hashlib
import json
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from linearize.errors import UserError
from linearize.train import latest_checkpoint, verify_checkpoint
from linearize.train.checkpoint import (MANIFEST, OPTIMIZER_FILE, TMP_PREFIX, TrainerState, load_checkpoint,
                                        save_checkpoint, tokens_fingerprint)
from linearize.train.metrics import MetricsLog
from test_train import read_metrics, tiny_job, tiny_stage_cfg

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def finished(tmp_path):
    """A stage dir whose newest checkpoint is step_2 (saved every step, two kept)."""
    stage_dir = tmp_path / "stage"
    tiny_job(stage_dir, tiny_stage_cfg(max_steps=2, save_every=1, eval_every=0))
    return stage_dir


def _more_steps(steps: int = 4):
    return tiny_stage_cfg(max_steps=steps, save_every=1, eval_every=0)


def _rehash(ckpt: Path) -> None:
    """What an attacker does after editing a checkpoint: recompute the manifest over every file."""
    manifest = json.loads((ckpt / MANIFEST).read_text())
    files = sorted(p.name for p in ckpt.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest["files"] = {name: hashlib.sha256((ckpt / name).read_bytes()).hexdigest() for name in files}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


class Payload:
    """Unpickling this creates `marker`: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_crafted_pickle_with_recomputed_manifest_never_runs(finished, tmp_path, name):
    ckpt = latest_checkpoint(finished)
    marker = tmp_path / "payload-ran"
    torch.save(Payload(marker), ckpt / name)
    _rehash(ckpt)
    with pytest.raises(UserError) as err:
        tiny_job(finished, _more_steps())
    assert re.search(rf"step_2 holds {re.escape(name)}, a pickle .* not read; use --force to re-run it from "
                     r"scratch \(or delete .*stage\)", _one_line(err))
    assert not marker.exists()


def test_linearize_itself_never_unpickles_or_carries_test_hooks():
    """No torch.load / pickle.load in the library (DeepSpeed's own loader is DeepSpeed's), and the old
    kill-after-checkpoint environment hook lives in tests/faults.py only."""
    for path in (REPO / "linearize").rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text and "pickle.load" not in text, path
        assert "LINEARIZE_FAULT" not in text and "signal.SIGKILL" not in text, path  # a docstring may name it


def test_optimizer_scaler_and_rng_state_round_trip_exactly(tmp_path):
    """fp16's grad-scaler state, AdamW's moments and every RNG come back exactly from safetensors+JSON."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scaler = {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 7,
              "_growth_tracker": 3}
    saved_optimizer = optimizer.state_dict()
    random.random(), np.random.rand(), torch.rand(1)  # move every generator off its seed
    schedule = SimpleNamespace(state_dict=lambda: {}, load_state_dict=lambda state: None)
    path = save_checkpoint(tmp_path, model, {"optimizer": saved_optimizer, "scaler": scaler}, {},
                           TrainerState(step=1, cursor=4, tokens=12), {}, keep_last=1,
                           data={"train_tokens": {}, "eval_tokens": {}})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    assert not list(path.glob("*.pt"))
    other = torch.optim.AdamW(model.parameters(), lr=0.5)
    state, extras = load_checkpoint(path, model, other, schedule)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert extras["scaler"] == scaler and state == TrainerState(step=1, cursor=4, tokens=12)
    loaded = other.state_dict()
    assert loaded["param_groups"] == saved_optimizer["param_groups"]  # betas stay a tuple, lr restored
    for index, moments in saved_optimizer["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded["state"][index][key], value), key


def test_fp16_resume_restores_the_grad_scaler(tmp_path):
    """float16 autocast trains with a GradScaler: its growth tracker and scale continue after a resume."""
    from linearize.train.checkpoint import _read_tree

    cfg = dict(save_every=2, eval_every=0, autocast="float16")
    tiny_job(tmp_path / "whole", tiny_stage_cfg(max_steps=4, **cfg))
    tiny_job(tmp_path / "resumed", tiny_stage_cfg(max_steps=2, **cfg))
    tiny_job(tmp_path / "resumed", tiny_stage_cfg(max_steps=4, **cfg))
    whole, resumed = (_read_tree(tmp_path / name / "step_4", OPTIMIZER_FILE)["scaler"] for name in ("whole", "resumed"))
    assert whole == resumed and whole["_growth_tracker"] == 4
    steps = [[(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / name)]
             for name in ("whole", "resumed")]
    assert steps[0] == steps[1]  # exact: same floats


def test_fingerprint_covers_bytes_shape_and_dtype():
    tokens = torch.arange(12).reshape(3, 4)  # [N, L]
    same = tokens_fingerprint(tokens.clone())["sha256"]
    assert tokens_fingerprint(tokens)["sha256"] == same
    assert tokens_fingerprint(tokens.reshape(4, 3))["sha256"] != same  # same bytes, other shape
    assert tokens_fingerprint(tokens.to(torch.int32))["sha256"] != same
    changed = tokens.clone()
    changed[2, 3] = 0
    assert tokens_fingerprint(changed)["sha256"] != same


def test_resume_onto_other_data_is_refused_unless_accepted(finished):
    with pytest.raises(UserError) as err:
        tiny_job(finished, _more_steps(3), data_seed=1)
    assert re.search(r"attention_transfer: the data changed since .*step_2 was written \(train data sha256 "
                     r"\w+… \[12, 16\] int64 -> sha256 \w+… \[12, 16\] int64; eval data", _one_line(err))
    result = tiny_job(finished, _more_steps(3), data_seed=1, accept_changes=True)
    assert result.resumed_from == 2 and result.step == 3
    tiny_job(finished, _more_steps(4), data_seed=1)  # the new data is now the recorded one


@pytest.mark.parametrize("code,cause", [(errno.ENOSPC, "disk full"), (errno.EDQUOT, "disk quota exceeded"),
                                        (errno.EROFS, "read-only file system")])
def test_write_fault_at_a_checkpoint_keeps_the_last_good_one(finished, monkeypatch, code, cause):
    """An injected fault at every errno the cause is named for; tests/test_write_faults.py makes them real."""
    import safetensors.torch

    real_save_file = safetensors.torch.save_file

    def failing_save_file(tensors, path, *args, **kwargs):
        if f"{TMP_PREFIX}3-" in str(path):
            raise OSError(code, "injected fault", str(path))
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(UserError) as err:
        tiny_job(finished, _more_steps())
    message = _one_line(err)
    assert re.search(rf"cannot write .*step_3: {cause} \(trainable.safetensors: \[Errno {code}\] injected fault.*\); "
                     r"the last good checkpoint .*step_2 is intact", message)
    assert not list(finished.glob(f"{TMP_PREFIX}*")) and latest_checkpoint(finished).name == "step_2"
    verify_checkpoint(finished / "step_2")
    monkeypatch.undo()
    assert tiny_job(finished, _more_steps()).resumed_from == 2


def test_write_fault_in_metrics_and_plot_is_one_line(finished, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MetricsLog, "append", full)
    with pytest.raises(UserError, match=r"cannot write .*metrics.jsonl: .*No space left.*step_2 is intact"):
        tiny_job(finished, _more_steps())
    monkeypatch.undo()
    from matplotlib.figure import Figure

    (finished / "loss.png").unlink()
    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(UserError, match=r"cannot write .*loss.png: .*No space left.*step_4 is intact"):
        tiny_job(finished, _more_steps())
    assert not list(finished.glob(".loss.png*")) and not (finished / "loss.png").exists()


def _manifest_cases(outside: Path):
    sha = "0" * 64
    return [
        ("not json {", r"unreadable manifest.json"),
        ("[1, 2]", r"manifest.json \(not a JSON object\)"),
        ('{"step": 2}', r'manifest.json \(no "files" mapping'),
        ('{"files": ["state.json"]}', r'manifest.json \(no "files" mapping'),
        (json.dumps({"files": {"../" + outside.name: sha}}), r"lists '\.\./outside.txt', which is not a file name"),
        (json.dumps({"files": {str(outside): sha}}), r"which is not a file name inside the checkpoint"),
        (json.dumps({"files": {"sub/state.json": sha}}), r"lists 'sub/state.json', which is not a file name"),
        (json.dumps({"files": {"state.json": 5}}), r"the hash of 'state.json' is not a sha256"),
    ]


def test_malformed_manifests_are_one_line_errors(finished):
    ckpt = latest_checkpoint(finished)
    outside = ckpt.parent.parent / "outside.txt"
    outside.write_text("not part of the checkpoint")
    for text, match in _manifest_cases(outside):
        (ckpt / MANIFEST).write_text(text)
        with pytest.raises(UserError) as err:
            verify_checkpoint(ckpt)
        assert re.search(rf"checkpoint .*step_2 is (corrupt|malformed): .*{match}", _one_line(err)), text


def test_a_manifest_entry_linking_outside_is_refused(finished):
    ckpt = latest_checkpoint(finished)
    outside = ckpt.parent.parent / "outside.txt"
    outside.write_text("secret")
    (ckpt / "link.txt").symlink_to(outside)
    _rehash(ckpt)
    with pytest.raises(UserError, match=r"malformed: manifest.json \(link.txt links outside the checkpoint\)"):
        verify_checkpoint(ckpt)


@pytest.mark.parametrize("name, text, match", [
    ("state.json", "[]", r"state.json \(not a JSON object\)"),
    ("state.json", '{"step": "2", "cursor": 8, "tokens": 128}', r"state.json \(expected non-negative integers"),
    ("state.json", '{"step": 2}', r"state.json \(expected non-negative integers"),
    ("scheduler.json", "{", r"scheduler.json \(Expecting"),
    ("scheduler.json", '{"scale": "0.1"}', r"scheduler.json \(a schedule state holds numbers only"),
    ("config.json", "not json", r"config.json \(Expecting value"),
    ("data.json", '"train"', r"data.json \(not a JSON object\)"),
    ("optimizer.safetensors", "garbage", r"optimizer.safetensors \("),
])
def test_malformed_files_inside_a_checkpoint_are_one_line_errors(finished, name, text, match):
    ckpt = latest_checkpoint(finished)
    (ckpt / name).write_text(text)
    _rehash(ckpt)
    with pytest.raises(UserError) as err:
        tiny_job(finished, _more_steps())
    assert re.search(rf"checkpoint .*step_2 is malformed: {match}", _one_line(err))


def test_changed_parameter_shape_names_the_parameter_and_both_shapes(finished):
    """As after resuming with a changed model or attention.feature_dim under accept_changes."""
    with pytest.raises(UserError) as err:
        tiny_job(finished, _more_steps(), accept_changes=True, intermediate_size=96)
    assert re.search(r"does not fit the model: parameter model.layers.1.mlp.\w+_proj.weight has shape "
                     r"\[(128, 64|64, 128)\] there and \[(96, 64|64, 96)\] in the model", _one_line(err))


def test_optimizer_state_of_another_shape_names_the_parameter(finished):
    from linearize.train.checkpoint import _read_tree
    from linearize.train.state_tree import write_tree as _write_tree

    ckpt = latest_checkpoint(finished)
    saved = _read_tree(ckpt, OPTIMIZER_FILE)
    moments = saved["optimizer"]["state"][0]
    moments["exp_avg"] = torch.zeros(3, 5)
    _write_tree(ckpt / OPTIMIZER_FILE, saved)
    _rehash(ckpt)
    with pytest.raises(UserError) as err:
        tiny_job(finished, _more_steps())
    assert re.search(r"the optimizer state of parameter model.layers.1.\S+ has shape \[3, 5\] there", _one_line(err))


@pytest.mark.parametrize("structure", ['{"tensor": [1]}', '{"tuple": 3}', '{"dict": [[[], 1]]}', '[{"tensor": "9"}]'])
def test_malformed_state_tree_is_a_one_line_error(finished, structure):
    """A valid safetensors file whose JSON structure is not one linearize writes (tampered)."""
    from safetensors.torch import save_file

    from linearize.train.state_tree import STRUCTURE_KEY

    ckpt = latest_checkpoint(finished)
    save_file({"0": torch.zeros(1)}, ckpt / OPTIMIZER_FILE, metadata={STRUCTURE_KEY: structure})
    _rehash(ckpt)
    with pytest.raises(UserError) as err:
        tiny_job(finished, _more_steps())
    assert re.search(r"step_2 is malformed: optimizer.safetensors \(", _one_line(err))


def test_resume_keeps_one_metrics_record_per_step(finished):
    """Two processes that appended to one log (before the run-directory lock) leave step 2 twice and a
    step 3 past the checkpoint: the resumed log holds each step once."""
    log = finished / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines + [lines[1], json.dumps(dict(json.loads(lines[1]), step=3))]) + "\n")
    tiny_job(finished, _more_steps())
    assert [r["step"] for r in read_metrics(finished)] == [1, 2, 3, 4]


def test_metrics_log_refuses_a_step_it_already_holds(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 1.0})
    with pytest.raises(UserError, match=r"already holds step 3, this run is at step 3: another run"):
        log.append({"step": 3, "loss": 1.0})
    assert [r["step"] for r in log.read()] == [1, 2, 3]


def test_old_deepspeed_rng_pickles_are_refused_but_deepspeed_engine_files_are_allowed(tmp_path):
    ckpt = tmp_path / "step_2"
    (ckpt / "engine").mkdir(parents=True)
    (ckpt / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"deepspeed's own file")
    (ckpt / "rng_rank0.pt").write_bytes(b"old rng file")
    files = {name: hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
             for name in ("engine/mp_rank_00_model_states.pt", "rng_rank0.pt")}
    (ckpt / MANIFEST).write_text(json.dumps({"step": 2, "engine": "deepspeed", "world_size": 1, "files": files}))
    with pytest.raises(UserError, match=r"holds rng_rank0.pt, a pickle"):
        verify_checkpoint(ckpt)
    del files["rng_rank0.pt"]
    (ckpt / MANIFEST).write_text(json.dumps({"step": 2, "engine": "deepspeed", "world_size": 1, "files": files}))
    assert verify_checkpoint(ckpt)["files"] == files


def _fake_deepspeed_engine(ds):
    from linearize.train.distributed import DeepSpeedEngine

    return DeepSpeedEngine(ds=ds, model=torch.nn.Linear(2, 2), device=torch.device("cpu"), zero_stage=2, rank=0,
                           world_size=1)


def test_deepspeed_load_failure_says_to_trust_the_run_directory(tmp_path):
    """DeepSpeed unpickles its own files: when that fails, the one-line error says so."""
    import pickle

    from linearize.train.distributed import _load_engine_state

    def load_checkpoint(*args, **kwargs):
        raise pickle.UnpicklingError("invalid load key, 'x'.")

    ds = SimpleNamespace(load_checkpoint=load_checkpoint, _config=SimpleNamespace(load_universal_checkpoint=False))
    with pytest.raises(UserError) as err:
        _load_engine_state(_fake_deepspeed_engine(ds), tmp_path, saved_world=1)
    assert re.search(r"DeepSpeed could not load .*engine \(invalid load key, 'x'.\); DeepSpeed unpickles .* "
                     r"resume only run directories you trust", _one_line(err))


@pytest.fixture
def one_process_group():
    """A 1-rank gloo group, for the collectives of the DeepSpeed checkpoint writer."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_deepspeed_write_fault_removes_the_temp_dir(tmp_path, one_process_group):
    from linearize.train.distributed import save_engine_checkpoint

    def save_checkpoint(folder, **kwargs):
        (Path(folder) / "engine").mkdir()
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "engine" / "shard.pt"))

    engine = _fake_deepspeed_engine(SimpleNamespace(save_checkpoint=save_checkpoint))
    with pytest.raises(UserError) as err:
        save_engine_checkpoint(engine, tmp_path, {}, TrainerState(step=2), {}, keep_last=2, data={})
    assert re.search(r"cannot write .*step_2: disk full \(\[Errno 28\] No space left on device: .*shard.pt'\); "
                     "no checkpoint was written yet", _one_line(err))
    assert list(tmp_path.iterdir()) == []
