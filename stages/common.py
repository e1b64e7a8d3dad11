"""What every stage runner starts and ends with, written once: seed → the converted model with the
student parameters of the newest earlier stage (and, for the final student, the LoRA adapter) → the
resolved config dict; for a training stage the datasets, the loop and its metrics; and the DONE record."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import linearize
from linearize import adapters
from linearize.data import build_datasets, in_stage_eval
from linearize.errors import UserError
from linearize.evals.report import plot_layer_scores
from linearize.train import config_to_dict, distributed, seed_everything, train
from linearize.train.layer_choice import AUTO, REQUEST_KEYS, Probe, select_softmax_layers
from linearize.train.state import write_json_atomic
from linearize.train.student import load_converted, load_student

from .registry import STAGES, TRAINING_STAGES
from .rundir import SKIPPED, STUDENT_SOURCES, adapter_dir, find_student_file, mark_done


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


CALIBRATION_FILE = "calibration.json"


def start_stage(cfg, run_dir: Path, stage: str, sources=STUDENT_SOURCES) -> StageStart:
    """Seeds every RNG with cfg.seed (parameter inits, dropout), then builds the student from `sources`; a
    fresh student (no earlier stage's file) is calibrated when its layers ask for it. With
    `attention.softmax_layers: auto` the start's cfg holds the run's recorded choice of layers (made
    here if no stage recorded one), while its config dict keeps `auto`, as the run's config does."""
    config = config_to_dict(cfg)
    cfg = resolve_softmax_layers(cfg, Path(run_dir), stage)
    seed_everything(cfg.seed)
    model, tokenizer, source = build_student(cfg, run_dir, sources)
    start = StageStart(cfg, Path(run_dir) / stage, model, tokenizer, source, config)
    if source is None:
        calibrate_fresh_student(start)
    return start


LAYER_CHOICE_FILE = "softmax_layers.json"
LAYER_CHOICE_PLOT = "softmax_layers.png"


def find_layer_choice(run_dir: Path) -> Optional[Path]:
    """The run's recorded softmax layer choice: the file in the first stage folder, in pipeline order,
    that holds one (the choice lives in the stage that made it, so `--force` on that stage discards it)."""
    for stage in STAGES:
        path = Path(run_dir) / stage / LAYER_CHOICE_FILE
        if path.is_file():
            return path
    return None


def resolve_softmax_layers(cfg, run_dir: Path, stage: str):
    """cfg itself, or with `attention.softmax_layers: auto`, a new config holding the recorded choice
    (made now, in `<run>/<stage>/`, if no stage recorded one: a resumed stage never chooses again)."""
    if cfg.attention.softmax_layers != AUTO:
        return cfg
    if distributed.is_main_process() and find_layer_choice(run_dir) is None:
        _record_layer_choice(cfg, run_dir / stage, stage)
    if stage in TRAINING_STAGES:
        distributed.barrier()  # the ranks that train this stage together look only after rank 0 has written
    path = find_layer_choice(run_dir)
    record = json.loads(path.read_text())
    changed = [key for key, name in REQUEST_KEYS.items() if record.get(key) != getattr(cfg.attention, name)]
    if changed:
        asked = ", ".join(f"attention.{REQUEST_KEYS[k]}={getattr(cfg.attention, REQUEST_KEYS[k])} "
                          f"(recorded {record.get(k)})" for k in changed)
        raise UserError(f"{path} was chosen for other values: {asked}; re-run the stage that chose "
                        f"({path.parent.name}) with --force to choose again")
    return replace(cfg, attention=replace(cfg.attention, softmax_layers=list(record["choice"])))


def _record_layer_choice(cfg, stage_dir: Path, stage: str) -> None:
    """Runs the selector, writes its record atomically and the per-layer score plot, and says which
    layers it chose (rank 0 only)."""
    record = choose_softmax_layers(cfg)
    stage_dir.mkdir(parents=True, exist_ok=True)
    plot_layer_scores(record, stage_dir / LAYER_CHOICE_PLOT)
    path = stage_dir / LAYER_CHOICE_FILE
    write_json_atomic(path, record)
    print(f"{stage}: softmax layers {record['choice']} chosen by {record['selector']} from "
          f"{len(record['candidates'])} candidate layers (scores in {path})")


def choose_softmax_layers(cfg) -> dict:
    """The selector's record for cfg: scored on a throwaway model converted in every candidate layer,
    probing with the transfer stage's optimizer settings on the run's data, and held out: the first rows
    of its in-stage eval, as many as the probe trains on (at least one), so scoring costs about a third
    of the probe (forwards only)."""
    seed_everything(cfg.seed)
    model, tokenizer = load_converted(replace(cfg, attention=replace(cfg.attention, softmax_layers=[])))
    train_tokens, eval_tokens = build_datasets(cfg.data, tokenizer, cfg.seed)
    stage_cfg = cfg.attention_transfer
    probe_rows = max(1, cfg.attention.selection_steps * stage_cfg.micro_batch_size)
    held_out = in_stage_eval(eval_tokens, stage_cfg)[:probe_rows]
    probe = Probe(train=train_tokens, held_out=held_out, steps=cfg.attention.selection_steps,
                  lr=stage_cfg.lr, micro_batch_size=stage_cfg.micro_batch_size, grad_clip=stage_cfg.grad_clip,
                  mse_factor=stage_cfg.mse_factor)
    return select_softmax_layers(model, cfg.attention.softmax_layer_selector, cfg.attention.softmax_layer_count, probe)


def calibrate_fresh_student(start: StageStart) -> None:
    """`attention.init=calibrated`: one teacher forward over the first training tokens (at least
    `attention.calibration_tokens`, whole sequences) sets each converted layer's new parameters from its
    teacher attention statistics (`linearize.calibrating`). A training stage records what was set in
    `<stage>/calibration.json`. Deterministic (same data, same values), so a resumed stage, whose checkpoint
    then overwrites the parameters, and a later stage that starts fresh agree."""
    wanted = linearize.calibration_tokens(start.model)
    if wanted == 0:
        return
    cfg = start.cfg
    train_tokens, _ = build_datasets(cfg.data, start.tokenizer, cfg.seed)
    rows = min(len(train_tokens), math.ceil(wanted / cfg.data.seq_len))
    batch = train_tokens[:rows].to(next(start.model.parameters()).device)  # [rows, L]
    with torch.no_grad(), linearize.calibrating(start.model) as records:
        start.model(input_ids=batch)
    if start.stage_dir.name in TRAINING_STAGES and distributed.is_main_process():
        write_json_atomic(start.stage_dir / CALIBRATION_FILE,
                          {"init": cfg.attention.init, "tokens": int(batch.numel()),
                           "layers": {str(i): records[i] for i in sorted(records)}})
    if distributed.is_main_process():
        print(f"{start.stage_dir.name}: calibrated {len(records)} layers from the teacher's attention on "
              f"{batch.numel()} tokens")


def train_stage(start: StageStart, model: torch.nn.Module, loss_fn: Callable, stage_cfg,
                accept_changes: bool) -> dict:
    """Trains `model` (the start's model, or a wrapper of it) with `loss_fn` on cfg.data; returns the
    final metrics every training stage records."""
    cfg = start.cfg
    train_tokens, eval_tokens = build_datasets(cfg.data, start.tokenizer, cfg.seed)
    eval_tokens = in_stage_eval(eval_tokens, stage_cfg)
    result = train(model, loss_fn, train_tokens, eval_tokens, stage_cfg, stage_dir=start.stage_dir,
                   stage=start.stage_dir.name, seed=cfg.seed, engine_cfg=cfg.engine, config=start.config,
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
