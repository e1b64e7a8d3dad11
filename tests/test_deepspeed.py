"""DeepSpeed ZeRO on the CPU (DS_ACCELERATOR=cpu, gloo): 2 ranks launched by torchrun through the real
CLI train both stages of a tiny on-disk run with the per-step losses of a single process reading the
same global batch; a 2-rank run killed mid-stage resumes with the same subsequent losses; the export
equals the single-process export.

Global batch 4 both ways: single = micro 2 × accum 2 × 1 rank; DeepSpeed = micro 2 × accum 1 × 2 ranks.
The first DeepSpeed launch on a fresh machine JIT-builds a comm op (~50 s, then cached)."""
from __future__ import annotations

import contextlib
import importlib.util
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
import yaml

from linearize.errors import UserError
from test_stages import DELTA_MECHANISMS

# find_spec, not import: the test process itself never loads DeepSpeed, only the launched ranks do.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")

REPO = Path(__file__).resolve().parent.parent
RANKS = 2
TRAIN_STAGES = ("attention_transfer", "lora_recovery")
# Per-step losses after step 1 differ only by the order of float32 gradient sums (an all-reduce of two
# half-batch gradients vs one accumulated sum), ~1e-7 relative per step on this tiny model.
LOSS_RTOL = 1e-5
LAUNCH_TIMEOUT_S = 600
SINGLE = {"micro_batch_size": 2, "grad_accum": 2}
PER_RANK = {"micro_batch_size": 2, "grad_accum": 1}


def _sections(batch: dict, transfer_steps: int = 3, lora_steps: int = 3) -> dict:
    # dropout 0: per-rank dropout masks cannot reproduce one process's mask sequence.
    return {"attention_transfer": dict(batch, max_steps=transfer_steps, save_every=2, eval_every=2, keep_last=3),
            "lora_recovery": dict(batch, max_steps=lora_steps, save_every=2, eval_every=3, dropout=0.0,
                                  keep_last=3)}


def _config(root: Path, tokenizer_dir: Path, batch: dict, stages: list[str], attention: dict | None = None,
            **steps) -> dict:
    from stages.config_loader import config_to_dict
    from test_stages import tiny_run_config

    sections = _sections(batch, **steps)
    if attention:
        sections["attention"] = attention
    cfg = config_to_dict(tiny_run_config(root, tokenizer_dir, **sections))
    cfg["stages"] = stages
    return cfg


def _launch(config: dict, path: Path, zero_stage: int, kill_after: int | None = None, ranks: int = RANKS,
            extra: tuple = ()) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m linearize run CONFIG engine.name=deepspeed ...` on the CPU."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # tests/faults.py runs the same CLI, SIGKILLing every rank right after the step's checkpoint.
    entry = ["-m", "linearize"] if kill_after is None else [str(REPO / "tests" / "faults.py"), str(kill_after)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               *entry, "run", str(path), "engine.name=deepspeed", f"engine.zero_stage={zero_stage}",
               "engine.precision=fp32", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=REPO)


def _run_single(config: dict) -> None:
    from stages.config_loader import config_from_dict
    from stages.pipeline import run_stages

    with contextlib.redirect_stdout(io.StringIO()):
        run_stages(config_from_dict(config, "single"))


def _losses(stage_dir: Path) -> list[tuple]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r.get("eval_loss"), r["tokens"]) for r in map(json.loads, lines)]


def _assert_close_losses(got: list[tuple], want: list[tuple]) -> None:
    assert [r[0] for r in got] == [r[0] for r in want]
    assert [r[3] for r in got] == [r[3] for r in want]  # same tokens: same global batch
    for (step, loss, eval_loss, _), (_, ref_loss, ref_eval, _) in zip(got, want):
        assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL), f"step {step}"
        assert (eval_loss is None) == (ref_eval is None), f"step {step}"
        if eval_loss is not None:
            assert eval_loss == pytest.approx(ref_eval, rel=LOSS_RTOL), f"step {step}"


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_tokenizer):
    """The single-process reference: both stages + export, global batch 4."""
    root = tmp_path_factory.mktemp("single")
    stages = [*TRAIN_STAGES, "export"]
    _run_single(_config(root, tiny_tokenizer, SINGLE, stages))
    return root / "runs" / "tiny"


def _deepspeed_run(root: Path, tokenizer_dir: Path, zero_stage: int) -> Path:
    config = _config(root, tokenizer_dir, PER_RANK, [*TRAIN_STAGES, "export"])
    done = _launch(config, root / "config.yaml", zero_stage)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return root / "runs" / "tiny"


def _assert_same_export(run_dir: Path, ref_dir: Path) -> None:
    from safetensors.torch import load_file

    from stages.export import export_dir

    got, want = (load_file(export_dir(d) / "model.safetensors") for d in (run_dir, ref_dir))
    assert got.keys() == want.keys()
    # Weights after a few AdamW steps from gradients summed in a different order: lr-sized steps whose
    # rounding differs at float32 epsilon, well inside 1e-5.
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=LOSS_RTOL, atol=LOSS_RTOL, msg=name)


def test_zero2_both_stages_match_single_process(tmp_path, tiny_tokenizer, single_run):
    run_dir = _deepspeed_run(tmp_path, tiny_tokenizer, zero_stage=2)
    for stage in TRAIN_STAGES:
        _assert_close_losses(_losses(run_dir / stage), _losses(single_run / stage))
        manifest = json.loads((run_dir / stage / "step_2" / "manifest.json").read_text())
        assert manifest["engine"] == "deepspeed" and manifest["world_size"] == RANKS
        assert any(name.startswith("engine/") for name in manifest["files"])
    _assert_same_export(run_dir, single_run)
    assert (run_dir / "report.md").is_file()


# A 2-rank launch costs about a minute on 2 cores: the first delta mechanism runs in the default tier, the
# others (the same ZeRO path with a different decay) only in the slow one.
DELTA_CASES = [pytest.param(m, marks=() if i == 0 else pytest.mark.slow) for i, m in enumerate(DELTA_MECHANISMS)]


@pytest.mark.parametrize("mechanism", DELTA_CASES)
def test_zero2_delta_student_with_softmax_layers_matches_single_process(tmp_path, tiny_tokenizer, mechanism):
    """A delta-rule student with layer 1 of 2 kept as softmax attention: transfer (calibrated init, MSE)
    and LoRA with KL under ZeRO-2 on 2 ranks give the single process's per-step losses."""
    attention = {"mechanism": mechanism, "softmax_layers": [1]}
    for name in ("single", "ranks"):
        (tmp_path / name).mkdir()
    single = _config(tmp_path / "single", tiny_tokenizer, SINGLE, list(TRAIN_STAGES), attention)
    assert single["lora_recovery"]["kl_weight"] > 0
    _run_single(single)
    config = _config(tmp_path / "ranks", tiny_tokenizer, PER_RANK, list(TRAIN_STAGES), attention)
    done = _launch(config, tmp_path / "ranks.yaml", zero_stage=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for stage in TRAIN_STAGES:
        _assert_close_losses(_losses(tmp_path / "ranks" / "runs" / "tiny" / stage),
                             _losses(tmp_path / "single" / "runs" / "tiny" / stage))


def test_zero2_stage_2_without_an_adapter_matches_single_process(tmp_path, tiny_tokenizer):
    """`lora_recovery.targets: []` with `train_student`: ZeRO-2 wraps the student itself (no peft model), with
    the teacher's weights frozen inside it. Same per-step losses as one process, the same export, and no
    adapter written by either."""
    from safetensors.torch import load_file

    from stages.rundir import ADAPTER_DIR, RunDir

    no_adapter = {"targets": [], "train_student": True, "lr": 1e-2}
    runs = {}
    for name in ("single", "ranks"):
        (tmp_path / name).mkdir()
        config = _config(tmp_path / name, tiny_tokenizer, SINGLE if name == "single" else PER_RANK,
                         [*TRAIN_STAGES, "export"])
        config["lora_recovery"].update(no_adapter)
        if name == "single":
            _run_single(config)
        else:
            done = _launch(config, tmp_path / "ranks.yaml", zero_stage=2)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        runs[name] = tmp_path / name / "runs" / "tiny"
    _assert_close_losses(*(_losses(runs[name] / "lora_recovery") for name in ("ranks", "single")))
    for run_dir in runs.values():
        # the student trains in stage 2: its parameters leave stage 1's (losses alone differ by batch anyway)
        before, after = (load_file(RunDir(run_dir).stage(stage).student) for stage in TRAIN_STAGES)
        assert any(not torch.equal(before[name], after[name]) for name in before), run_dir
        assert not any(p.name == ADAPTER_DIR for p in (run_dir / "lora_recovery").rglob("*")), run_dir
    _assert_same_export(runs["ranks"], runs["single"])


@pytest.mark.slow
def test_zero3_both_stages_match_single_process(tmp_path, tiny_tokenizer, single_run):
    """ZeRO-3 partitions the frozen teacher weights too: the transfer teacher and the KL teacher must
    still see full weights, else their losses would be far from the single-process ones."""
    run_dir = _deepspeed_run(tmp_path, tiny_tokenizer, zero_stage=3)
    for stage in TRAIN_STAGES:
        _assert_close_losses(_losses(run_dir / stage), _losses(single_run / stage))
    _assert_same_export(run_dir, single_run)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_killed_mid_stage_resume_with_same_losses(tmp_path, tiny_tokenizer, zero_stage):
    """Killed right after LoRA's step-4 checkpoint, which is then lost: resume from step 2, redo 3-5."""
    stages = list(TRAIN_STAGES)
    config = _config(tmp_path / "assets", tiny_tokenizer, PER_RANK, stages, transfer_steps=2, lora_steps=5)
    whole, killed = (dict(config, output_dir=str(tmp_path / name)) for name in ("whole", "killed"))
    done = _launch(whole, tmp_path / "whole.yaml", zero_stage)
    assert done.returncode == 0, done.stderr[-5000:]
    crash = _launch(killed, tmp_path / "killed.yaml", zero_stage, kill_after=4)
    assert crash.returncode != 0
    lora_dir = tmp_path / "killed" / "tiny" / "lora_recovery"
    assert not (lora_dir / "DONE").exists() and (lora_dir / "step_4").is_dir()
    shutil.rmtree(lora_dir / "step_4")
    resumed = _launch(killed, tmp_path / "killed.yaml", zero_stage)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    for stage in stages:
        assert _losses(tmp_path / "killed" / "tiny" / stage) == _losses(tmp_path / "whole" / "tiny" / stage)
    assert len(_losses(lora_dir)) == 5


@pytest.mark.slow
def test_resume_on_another_world_size_through_a_universal_checkpoint(tmp_path, tiny_tokenizer):
    """2 ranks × accum 1 write step 2; 1 rank × accum 2 (same global batch, --accept-changes for the changed
    grad_accum) resumes it through ds_to_universal: steps 3-4 need the restored weights and AdamW
    moments to reproduce the 2-rank losses."""
    config = _config(tmp_path / "assets", tiny_tokenizer, PER_RANK, ["attention_transfer"], transfer_steps=4)
    whole, moved = (dict(config, output_dir=str(tmp_path / name)) for name in ("whole", "moved"))
    done = _launch(whole, tmp_path / "whole.yaml", zero_stage=2)
    assert done.returncode == 0, done.stderr[-5000:]
    crash = _launch(moved, tmp_path / "moved.yaml", zero_stage=2, kill_after=2)
    assert crash.returncode != 0
    stage_dir = tmp_path / "moved" / "tiny" / "attention_transfer"
    resumed = _launch(moved, tmp_path / "moved.yaml", zero_stage=2, ranks=1,
                      extra=("attention_transfer.grad_accum=2", "--accept-changes"))
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    _assert_close_losses(_losses(stage_dir), _losses(tmp_path / "whole" / "tiny" / "attention_transfer"))
    assert (stage_dir / "step_2" / "universal").is_dir()


def test_deepspeed_config_from_engine_and_stage():
    """The config mapping alone (no process group): batch geometry, ZeRO stage, precision, offload."""
    from linearize.config.schema import EngineConfig, TransferConfig
    from linearize.train.distributed import deepspeed_config

    stage = TransferConfig(micro_batch_size=3, grad_accum=4, grad_clip=0.5)
    config = deepspeed_config(EngineConfig(name="deepspeed", zero_stage=3, precision="bf16",
                                           offload_optimizer=True, offload_params=True), stage, world=2)
    assert config["train_batch_size"] == 3 * 4 * 2
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (3, 4)
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                           "offload_param": {"device": "cpu"}}
    assert "fp16" not in deepspeed_config(EngineConfig(precision="fp32"), stage, world=1)
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        deepspeed_config(EngineConfig(precision="int8"), stage, world=1)
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(EngineConfig(zero_stage=0), stage, world=1)
    with pytest.raises(UserError, match="offload_params"):
        deepspeed_config(EngineConfig(zero_stage=2, offload_params=True), stage, world=1)


def test_importing_linearize_does_not_import_deepspeed():
    """DeepSpeed loads only when engine.name=deepspeed builds an engine (a fresh process: pytest's may
    hold it already)."""
    code = ("import sys, linearize, linearize.train, linearize.train.distributed, stages.pipeline, stages.cli; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_cli_accepts_the_deepspeed_launchers_local_rank():
    """`deepspeed --module linearize` puts --local_rank=N before the subcommand; torchrun-style after."""
    from stages.cli import build_parser, parse_args

    for argv in (["--local_rank=1", "run", "c.yaml", "engine.name=deepspeed"],
                 ["run", "c.yaml", "engine.name=deepspeed", "--local_rank=1"]):
        args = parse_args(build_parser(), argv)
        assert args.config == "c.yaml" and args.overrides == ["engine.name=deepspeed"]


def test_single_engine_refuses_a_deepspeed_checkpoint(tmp_path):
    from linearize.train.checkpoint import MANIFEST, load_checkpoint

    (tmp_path / MANIFEST).write_text(json.dumps({"step": 2, "engine": "deepspeed", "world_size": 2, "files": {}}))
    with pytest.raises(UserError, match="engine.name=deepspeed"):
        load_checkpoint(tmp_path, torch.nn.Linear(2, 2), None, None)


def test_each_rank_gets_its_own_triton_cache(monkeypatch, tmp_path):
    from linearize.train.distributed import TRITON_CACHE_BASE_ENV, TRITON_CACHE_ENV, set_triton_cache_per_rank

    monkeypatch.setenv(TRITON_CACHE_BASE_ENV, "")  # registers it for restoring: the code sets it
    monkeypatch.delenv(TRITON_CACHE_BASE_ENV)
    monkeypatch.setenv(TRITON_CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert set_triton_cache_per_rank() == tmp_path / "rank1"
    assert os.environ[TRITON_CACHE_ENV] == str(tmp_path / "rank1")
    assert set_triton_cache_per_rank() == tmp_path / "rank1"  # a second call does not nest
