"""Exact resume: a job SIGKILLed right after a checkpoint, then resumed, logs exactly the per-step
losses of an uninterrupted job (data order by seed + cursor, RNG, optimizer and schedule restored)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent
# One thread in every subprocess: CPU reduction order then cannot depend on the thread pool.
JOB = """
import sys, torch
torch.set_num_threads(1)
sys.path[:0] = [{tests!r}, {repo!r}]
from faults import kill_after_checkpoint
from test_train import tiny_job, tiny_stage_cfg
if {kill_after!r} is not None:
    kill_after_checkpoint({kill_after!r})
tiny_job({stage_dir!r}, tiny_stage_cfg(max_steps=8, save_every=3, eval_every=2, keep_last=2))
"""


def _run_job(stage_dir: Path, kill_after: int | None = None) -> subprocess.CompletedProcess:
    code = JOB.format(tests=str(TESTS_DIR), repo=str(REPO), stage_dir=str(stage_dir), kill_after=kill_after)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _losses(stage_dir: Path) -> list[tuple]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r.get("eval_loss"), r["lr"], r["tokens"]) for r in map(json.loads, lines)]


@pytest.mark.parity
def test_killed_and_resumed_job_matches_uninterrupted(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = _run_job(whole)
    assert done.returncode == 0, done.stderr[-2000:]
    crash = _run_job(killed, kill_after=6)
    assert crash.returncode == -signal.SIGKILL
    assert len(_losses(killed)) == 6
    # Losing the newest checkpoint forces a resume from step 3 with metrics lines 4..6 to discard.
    shutil.rmtree(killed / "step_6")
    resumed = _run_job(killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(_losses(whole)) == 8
    assert _losses(killed) == _losses(whole)  # exact: same floats, not approximately


STAGE_JOB = """
import json, sys, torch
torch.set_num_threads(1)
sys.path[:0] = [{tests!r}, {repo!r}]
from faults import kill_after_checkpoint
from stages.config_loader import config_from_dict
from stages.pipeline import run_stages
if {kill_after!r} is not None:
    kill_after_checkpoint({kill_after!r})
run_stages(config_from_dict(json.loads({config!r}), "resume-test"))
"""


def _run_stages_job(config: dict, kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    code = STAGE_JOB.format(tests=str(TESTS_DIR), repo=str(REPO), config=json.dumps(config), kill_after=kill_after)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parity
def test_pipeline_killed_in_lora_resumes_exactly(tmp_path, tiny_tokenizer):
    """Transfer (2 steps) then LoRA with dropout and KL, killed after LoRA's step-4 checkpoint; the
    step-4 checkpoint is then lost, so LoRA resumes from step 2 and re-does steps 3-4."""
    from stages.config_loader import config_to_dict
    from test_stages import tiny_run_config

    cfg = config_to_dict(tiny_run_config(
        tmp_path, tiny_tokenizer, attention_transfer={"max_steps": 2, "save_every": 2},
        lora_recovery={"max_steps": 5, "save_every": 2, "eval_every": 2, "dropout": 0.1, "keep_last": 3}))
    cfg["stages"] = ["attention_transfer", "lora_recovery"]
    whole, killed = dict(cfg, output_dir=str(tmp_path / "whole")), dict(cfg, output_dir=str(tmp_path / "killed"))
    done = _run_stages_job(whole)
    assert done.returncode == 0, done.stderr[-3000:]
    crash = _run_stages_job(killed, kill_after=4)
    assert crash.returncode == -signal.SIGKILL, crash.stderr[-3000:]
    lora_dir = tmp_path / "killed" / "tiny" / "lora_recovery"
    assert not (lora_dir / "DONE").exists() and (tmp_path / "killed" / "tiny" / "attention_transfer" / "DONE").exists()
    shutil.rmtree(lora_dir / "step_4")
    resumed = _run_stages_job(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "attention_transfer: done, skipping" in resumed.stdout
    for stage in ("attention_transfer", "lora_recovery"):
        assert _losses(tmp_path / "killed" / "tiny" / stage) == _losses(tmp_path / "whole" / "tiny" / stage)
    assert len(_losses(lora_dir)) == 5
