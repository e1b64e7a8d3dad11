"""Block-wise attention transfer (attention_transfer.block_size): the same student as all-at-once
transfer, exact resume per block after a SIGKILL, the hidden-state cache within its disk budget (and the
recompute fallback), lazily loaded layers, parallel blocks joined into one student, and the LoRA stage on
top."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent
STUDENT = Path("attention_transfer") / "student.safetensors"
# Adam divides by sqrt(v): gradients that differ in the last float bit (cached vs recomputed teacher states,
# another summation order) move a parameter by ~lr·1e-6 per step; over 4 steps at lr 1e-2 that stays far below.
PARAM_TOL = 1e-5


def _config(root: Path, tokenizer_dir: Path, layers: int = 4, **overrides):
    """A transfer-only run on a tiny llama with `layers` decoder layers; clipping off (block-wise clips
    per block), so block-wise and all-at-once transfer compute the same steps."""
    from stages.config_loader import config_from_dict, config_to_dict
    from test_stages import tiny_run_config

    cfg = tiny_run_config(root, tokenizer_dir, attention_transfer={"grad_clip": 0.0})
    teacher = root / f"teacher{layers}"
    if not teacher.exists():
        tiny_model("llama", num_hidden_layers=layers).save_pretrained(teacher)
        for item in Path(tokenizer_dir).iterdir():
            shutil.copy(item, teacher / item.name)
    data = config_to_dict(cfg)
    data["stages"] = ["attention_transfer"]
    items = [f"model.path={teacher}", *[f"{k}={v}" for k, v in overrides.items()]]
    return config_from_dict(data, "test", items)


def _run(cfg, stages=None):
    from stages.pipeline import run_dir_of, run_stages

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = run_stages(cfg, stages)
    return run_dir_of(cfg), results, printed.getvalue()


def _losses(path: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in map(json.loads, path.read_text().splitlines())]


def _assert_same_student(a: dict, b: dict, tol: float = PARAM_TOL) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


@pytest.fixture(scope="module")
def all_at_once(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("blockwise")
    run_dir, results, _ = _run(_config(root, tiny_tokenizer, run_name="whole"))
    return root, run_dir, results


@pytest.mark.parametrize("block_size", [1, 2])
def test_blockwise_transfer_gives_the_all_at_once_student(all_at_once, tiny_tokenizer, block_size):
    root, whole, whole_results = all_at_once
    run_dir, results, printed = _run(_config(root, tiny_tokenizer, run_name=f"k{block_size}",
                                             **{"attention_transfer.block_size": block_size}))
    _assert_same_student(load_file(run_dir / STUDENT), load_file(whole / STUDENT))
    metrics = results["attention_transfer"]
    assert metrics["blocks"] == 4 // block_size and metrics["step"] == whole_results["attention_transfer"]["step"]
    # Each layer weighs 1/4 in every block, so the blocks' losses add up to the all-at-once loss.
    for got, want in zip(_losses(run_dir / "attention_transfer" / "metrics.jsonl"),
                         _losses(whole / "attention_transfer" / "metrics.jsonl"), strict=True):
        assert got[0] == want[0]
        assert got[1] == pytest.approx(want[1], rel=1e-5)  # fp32 sums of the same per-layer losses
    assert not (run_dir / "attention_transfer" / "hidden").exists()  # the cache is freed once the stage is done
    assert "all blocks trained" in printed


def test_blockwise_transfer_with_auto_softmax_layers_gives_the_all_at_once_student(tmp_path, tiny_tokenizer):
    """`softmax_layers: auto` is chosen once, before the blocks (the same probe as all at once), and the
    block students are bit-identical to the all-at-once student of the same choice."""
    auto = {"attention.softmax_layers": "auto", "attention.softmax_layer_count": 1, "attention.selection_steps": 2}
    whole, _, _ = _run(_config(tmp_path, tiny_tokenizer, run_name="whole", **auto))
    blocks, _, printed = _run(_config(tmp_path, tiny_tokenizer, run_name="k2", **auto,
                                      **{"attention_transfer.block_size": 2}))
    choices = [json.loads((run / "attention_transfer" / "softmax_layers.json").read_text())["choice"]
               for run in (whole, blocks)]
    assert choices[0] == choices[1] and len(choices[0]) == 1
    assert printed.count("softmax layers [") == 1  # chosen once, not once per block
    student = load_file(blocks / STUDENT)
    assert not any(f".layers.{choices[0][0]}." in name for name in student)  # the kept layer trains nothing
    _assert_same_student(student, load_file(whole / STUDENT), tol=0)  # clipping off: the same floats


def test_a_small_disk_budget_recomputes_and_says_so(all_at_once, tiny_tokenizer):
    """Room for one of three block inputs: layers 2 and 3 recompute theirs from layer 1's stored states."""
    root, whole, _ = all_at_once
    rows = 4 + 2  # the 4 training rows 4 steps of one sequence read, and the 2 eval rows
    one_boundary = rows * 32 * 64 * 4  # rows × seq_len × hidden × fp32 bytes
    budget = 1.5 * one_boundary / 10**9
    run_dir, _, printed = _run(_config(root, tiny_tokenizer, run_name="budget", **{
        "attention_transfer.block_size": 1, "attention_transfer.cache_gb": budget}))
    assert "storing 1, recomputing the inputs of the blocks at layers [2, 3]" in printed
    _assert_same_student(load_file(run_dir / STUDENT), load_file(whole / STUDENT))


def test_a_smaller_cache_dtype_is_used_for_the_stored_states(all_at_once, tiny_tokenizer, monkeypatch):
    from linearize.train import hidden_cache

    root, whole, _ = all_at_once
    written = []
    save = hidden_cache.save_safetensors
    monkeypatch.setattr(hidden_cache, "save_safetensors", lambda tensors, *a, **k: (written.append(tensors["hidden"].dtype),
                                                                              save(tensors, *a, **k))[1])
    run_dir, _, _ = _run(_config(root, tiny_tokenizer, run_name="bf16", **{
        "attention_transfer.block_size": 2, "attention_transfer.cache_dtype": "bfloat16"}))
    assert written == [torch.bfloat16]
    # bf16 keeps 8 bits of mantissa: the second block trains on inputs rounded by ~0.4%.
    _assert_same_student(load_file(run_dir / STUDENT), load_file(whole / STUDENT), tol=5e-2)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_lazy_layers_compute_the_full_models_hidden_states(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    from linearize.models.lazy import LazyDecoder, SafetensorsReader

    tiny_model(arch, num_hidden_layers=3).save_pretrained(tmp_path)
    full = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    lazy = LazyDecoder(SafetensorsReader.for_model(tmp_path), torch.float32)
    with torch.no_grad():
        states = full(input_ids=ids, output_hidden_states=True).hidden_states
        hidden = lazy.embed(ids)
        lazy.load([0, 1])
        hidden = lazy(hidden)
        assert sorted({name.split(".")[2] for name, _ in lazy.named_parameters()}) == ["0", "1"]
        lazy.release()
        lazy.load([2])
        last = lazy(hidden)
    assert torch.equal(hidden, states[2])  # the same modules and weights, one call each
    # hidden_states[-1] is after the final norm, which stage 1 never needs: compare layer 2 alone.
    with torch.no_grad():
        layer_out = full.model.layers[2](states[2], position_embeddings=full.model.rotary_emb(states[2], torch.arange(12)[None]))
    torch.testing.assert_close(last, layer_out, rtol=0, atol=0)


def test_lazy_reader_refuses_a_folder_without_safetensors(tmp_path):
    from linearize.errors import UserError
    from linearize.models.lazy import SafetensorsReader

    with pytest.raises(UserError, match="has no model.safetensors"):
        SafetensorsReader.for_model(tmp_path)


BLOCK_JOB = """
import json, os, signal, sys, torch
torch.set_num_threads(1)
sys.path[:0] = [{tests!r}, {repo!r}]
from linearize.train.engine import Engine
from stages.config_loader import config_from_dict
from stages.pipeline import run_stages
save = Engine.save
def save_then_kill(self, stage_dir, schedule_state, state, *args, **kwargs):
    path = save(self, stage_dir, schedule_state, state, *args, **kwargs)
    if (stage_dir.name, state.step) == {kill_at!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
Engine.save = save_then_kill
run_stages(config_from_dict(json.loads({config!r}), "blockwise-resume"))
"""


def _run_job(config: dict, kill_at=None, env=None) -> subprocess.CompletedProcess:
    code = BLOCK_JOB.format(tests=str(TESTS_DIR), repo=str(REPO), config=json.dumps(config), kill_at=kill_at)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **(env or {})))


def test_a_killed_block_resumes_exactly(tmp_path, tiny_tokenizer):
    """Two one-layer blocks, 4 steps, checkpoints at 2 and 4; killed right after block 1's step-2
    checkpoint: block 0 is done and skipped, block 1 resumes from step 2 and logs the uninterrupted losses."""
    from stages.config_loader import config_to_dict

    cfg = config_to_dict(_config(tmp_path, tiny_tokenizer, layers=2, **{"attention_transfer.block_size": 1}))
    whole, killed = dict(cfg, output_dir=str(tmp_path / "whole")), dict(cfg, output_dir=str(tmp_path / "killed"))
    done = _run_job(whole)
    assert done.returncode == 0, done.stderr[-3000:]
    crash = _run_job(killed, kill_at=("block_1", 2))
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-3000:]
    stage = Path("tiny") / "attention_transfer"
    assert (tmp_path / "killed" / stage / "block_0" / "DONE").is_file()
    assert not (tmp_path / "killed" / stage / "block_1" / "DONE").exists()
    resumed = _run_job(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "block 1/2 (layers 0-0) done, skipping" in resumed.stdout
    for block in ("block_0", "block_1"):
        assert (_losses(tmp_path / "killed" / stage / block / "metrics.jsonl")
                == _losses(tmp_path / "whole" / stage / block / "metrics.jsonl"))  # exact: same floats
    assert _losses(tmp_path / "killed" / stage / "metrics.jsonl") == _losses(tmp_path / "whole" / stage / "metrics.jsonl")
    _assert_same_student(load_file(tmp_path / "killed" / "tiny" / STUDENT), load_file(tmp_path / "whole" / "tiny" / STUDENT),
                         tol=0)


def test_lora_recovery_and_export_run_on_a_blockwise_student(tmp_path, tiny_tokenizer):
    from stages.config_loader import config_from_dict, config_to_dict

    cfg = _config(tmp_path, tiny_tokenizer, layers=2, **{"attention_transfer.block_size": 1})
    cfg = config_from_dict(config_to_dict(cfg), "test", ["stages=[attention_transfer,lora_recovery,evaluate]"])
    run_dir, results, _ = _run(cfg)
    assert results["lora_recovery"]["step"] == cfg.lora_recovery.max_steps
    assert results["evaluate"]["student_ppl"] > 0
    from stages.common import build_student

    student, _, source = build_student(cfg, run_dir, ("attention_transfer",))
    saved = load_file(run_dir / STUDENT)
    params = {name: p for name, p in student.named_parameters() if name in saved}
    assert source == run_dir / STUDENT and sorted(params) == sorted(saved)


def test_calibrated_blocks_match_the_calibrated_whole_model(tmp_path, tiny_tokenizer):
    """attention.init=calibrated: each fresh block calibrates on its cached input states, as the whole
    model calibrates on its own forward, and records what it set in its folder."""
    gated = {"attention.mechanism": "gated_delta", "attention.calibration_tokens": 40}
    whole, _, _ = _run(_config(tmp_path, tiny_tokenizer, run_name="whole", **gated))
    blocks, _, _ = _run(_config(tmp_path, tiny_tokenizer, run_name="k2", **gated, **{"attention_transfer.block_size": 2}))
    for b in (0, 1):
        record = json.loads((blocks / "attention_transfer" / f"block_{b}" / "calibration.json").read_text())
        assert sorted(record["layers"]) == [str(2 * b), str(2 * b + 1)]
    # The calibration statistics come from teacher forwards batched differently (2 rows at once vs rows
    # read back from the cache); mse_factor 1000 makes this loss large, so Adam's steps amplify that a little.
    _assert_same_student(load_file(blocks / STUDENT), load_file(whole / STUDENT), tol=2e-4)


def test_blocks_trained_on_two_ranks_join_into_the_one_rank_student(all_at_once, tiny_tokenizer, tmp_path):
    """torchrun with 2 ranks and the single engine: the ranks share the cache pass and the 4 one-layer
    blocks (rank r trains blocks r, r+2); rank 0 joins them into the stage's student file."""
    from stages.config_loader import save_resolved

    root, whole, _ = all_at_once
    cfg = _config(root, tiny_tokenizer, run_name="ranks", output_dir=str(tmp_path),
                  **{"attention_transfer.block_size": 1})
    save_resolved(cfg, tmp_path / "config.yaml")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + os.getpid() % 1000), "-m", "linearize", "run", str(tmp_path / "config.yaml")],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    stage = tmp_path / "ranks" / "attention_transfer"
    trained_by = {b: json.loads((stage / f"block_{b}" / "DONE").read_text())["metrics"]["rank"] for b in range(4)}
    assert trained_by == {0: 0, 1: 1, 2: 0, 3: 1}
    assert (stage / "DONE").is_file()
    _assert_same_student(load_file(stage / "student.safetensors"), load_file(whole / STUDENT))


def test_a_finished_block_under_a_changed_config_is_refused_naming_the_key(tmp_path, tiny_tokenizer):
    from linearize.errors import UserError

    blockwise = {"attention_transfer.block_size": 1, "attention_transfer.max_steps": 2}
    run_dir, _, _ = _run(_config(tmp_path, tiny_tokenizer, layers=2, **blockwise))
    (run_dir / "attention_transfer" / "DONE").unlink()  # as if killed after its blocks, before the join
    changed = _config(tmp_path, tiny_tokenizer, layers=2, **blockwise, **{"attention_transfer.lr": 0.5})
    with pytest.raises(UserError, match=r"attention_transfer: the config changed .*attention_transfer.lr"):
        _run(changed)


def test_accept_changes_continues_every_block_of_a_finished_stage(tmp_path, tiny_tokenizer):
    """--accept-changes on a finished block-wise stage with a higher max_steps trains each block on from its
    own last checkpoint (the stage folder itself holds no checkpoint); with no step left it is refused."""
    from linearize.errors import UserError
    from stages.pipeline import run_stages

    blockwise = {"attention_transfer.block_size": 1, "attention_transfer.max_steps": 2}
    run_dir, _, _ = _run(_config(tmp_path, tiny_tokenizer, layers=2, **blockwise))
    same_steps = _config(tmp_path, tiny_tokenizer, layers=2, **blockwise, **{"attention_transfer.lr": 0.5})
    with pytest.raises(UserError, match=r"no step left"):
        run_stages(same_steps, accept_changes=True)
    more = _config(tmp_path, tiny_tokenizer, layers=2, **{**blockwise, "attention_transfer.max_steps": 3,
                                                           "attention_transfer.lr": 0.5})
    with contextlib.redirect_stdout(io.StringIO()):
        run_stages(more, accept_changes=True)
    for block in ("block_0", "block_1"):
        steps = [step for step, _, _ in _losses(run_dir / "attention_transfer" / block / "metrics.jsonl")]
        assert steps == [1, 2, 3], block  # resumed at step 3, not retrained from scratch
