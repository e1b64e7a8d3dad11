"""What every stage runner starts and ends with, written once: seed → the converted model with the
student parameters of the newest earlier stage (and, for the final student, the LoRA adapter) → the
resolved config dict; for a training stage the datasets, the loop and its metrics; and the DONE record."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from linearize import adapters
from linearize.data import in_stage_eval
from linearize.surgery import calibrate, calibration_tokens
from linearize.train import config_to_dict, distributed, seed_everything, train
from linearize.files import write_json
from linearize.train.student import load_converted, load_student

from . import layer_choice
from .registry import TRAINING_STAGES
from .teacher_data import run_datasets
from .rundir import SKIPPED, STUDENT_SOURCES, StageDir, adapter_dir, find_student_file, mark_done


@dataclass
class StageStart:
    """A stage's starting point: its folder, the converted model and tokenizer, the student file loaded
    into the model (None: freshly initialized), and the resolved config as a plain dict."""

    cfg: Any
    stage_dir: Path
    model: torch.nn.Module
    tokenizer: Any
    student_from: Optional[Path]
    config: dict


def build_student(cfg, run_dir: Path, sources=STUDENT_SOURCES):
    """(linearized model, tokenizer, student file used or None) from cfg.model and cfg.attention, with the
    student parameters of the newest finished stage among `sources`."""
    model, tokenizer = load_converted(cfg)
    source = find_student_file(run_dir, sources)
    if source is not None:
        load_student(model, source)
    return model, tokenizer, source


def attach_adapter(model: torch.nn.Module, run_dir: Path):
    """The model with the LoRA stage's adapter (a PeftModel), or the model itself if LoRA did not run."""
    adapter = adapter_dir(run_dir)
    return model if adapter is None else adapters.attach(model, adapter)


def start_stage(cfg, run_dir: Path, stage: str, sources=STUDENT_SOURCES) -> StageStart:
    """Seeds every RNG with cfg.seed (parameter inits, dropout), then builds the student from `sources`; a
    fresh student (no earlier stage's file) is calibrated when its layers ask for it. With
    `attention.softmax_layers: auto` the start's cfg holds the run's recorded choice of layers
    (`stages.layer_choice`), while its config dict keeps `auto`, as the run's config does."""
    config = config_to_dict(cfg)
    cfg = layer_choice.applied(cfg, Path(run_dir))
    seed_everything(cfg.seed)
    model, tokenizer, source = build_student(cfg, run_dir, sources)
    start = StageStart(cfg, Path(run_dir) / stage, model, tokenizer, source, config)
    if source is None and calibration_tokens(model):  # the data is read only when a layer asks for it
        train_tokens, _ = run_datasets(cfg, tokenizer, run_dir, model)
        record_calibration(start.stage_dir, calibrate(model, train_tokens, cfg.attention.init))
    return start


def record_calibration(stage_dir: Path, record: Optional[dict]) -> None:
    """Keeps what calibration set (`<stage_dir>/calibration.json`, training stages and their blocks only:
    a later stage that starts fresh recomputes the same values) and says so in one line."""
    if record is None or not distributed.is_main_process():
        return
    if stage_dir.name in TRAINING_STAGES or stage_dir.parent.name in TRAINING_STAGES:
        write_json(StageDir(stage_dir).calibration, record)
    print(f"{stage_dir.name}: calibrated {len(record['layers'])} layers from the teacher's attention on "
          f"{record['tokens']} tokens")


def train_stage(start: StageStart, model: torch.nn.Module, loss_fn: Callable, stage_cfg,
                accept_changes: bool, data: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                stage: Optional[str] = None) -> dict:
    """Trains `model` (the start's model, or a wrapper of it) with `loss_fn` on cfg.data (or on `data`,
    the (train, eval) token rows already built from it); returns the final metrics every training stage
    records. `stage`: the stage whose config section applies (default: the start's folder name; a block
    of a block-wise stage trains in its own folder under its stage's section)."""
    cfg = start.cfg
    train_tokens, eval_tokens = data if data is not None else run_datasets(cfg, start.tokenizer, start.stage_dir.parent,
                                                                           start.model)
    eval_tokens = in_stage_eval(eval_tokens, stage_cfg)
    result = train(model, loss_fn, train_tokens, eval_tokens, stage_cfg, stage_dir=start.stage_dir,
                   stage=stage or start.stage_dir.name, seed=cfg.seed, engine_cfg=cfg.engine, config=start.config,
                   shuffle=cfg.data.shuffle, accept_changes=accept_changes)
    return {"step": result.step, "loss": result.loss, "eval_loss": result.eval_loss, "tokens": result.tokens,
            "plot": result.plot.name}


def finish_stage(start: StageStart, metrics: dict) -> dict:
    """Writes the stage's DONE record and returns its metrics."""
    mark_done(start.stage_dir, metrics, start.config)
    return metrics


def skip_stage(start: StageStart, reason: str) -> dict:
    """Records a stage that has nothing to do as done with `{"skipped": reason}` (later stages then find
    no output of it, as if it never ran) and says so in one line."""
    if distributed.is_main_process():
        print(f"{start.stage_dir.name}: skipped: {reason}")
    start.stage_dir.mkdir(parents=True, exist_ok=True)
    return finish_stage(start, {SKIPPED: reason})
