"""The run's choice of softmax layers (`attention.softmax_layers: auto`), made once per run and read by
every stage: the pipeline calls `ensure_choice` before a stage runs, and the stages build their student
with `applied(cfg, run_dir)`.

The record lives in the folder of the stage that was about to run when the choice was made (normally
attention_transfer), so `--force` on that stage discards it and chooses again; the probe model is a
throwaway converted in every candidate layer (`linearize.train.layer_choice`)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

from linearize.data import in_stage_eval
from linearize.data.recall import recall_examples
from linearize.errors import UserError
from linearize.evals.report import plot_layer_scores
from linearize.train import seed_everything
from linearize.train.layer_choice import AUTO, REQUEST_KEYS, SELECTORS, Probe, select_softmax_layers
from linearize.files import write_json
from linearize.train.student import load_converted

from .registry import STAGES

# Held-out recall sequences the recall selector scores each layer on: every candidate layer costs one
# forward of each, so a few suffice to rank 30 layers (docs/quality.md measures the choice).
RECALL_PROBE_EXAMPLES = 8
from .rundir import RunDir
from .teacher_data import run_datasets


def find_layer_choice(run_dir: Path) -> Optional[Path]:
    """The run's recorded choice: the file in the first stage folder, in pipeline order, that holds one."""
    for stage in STAGES:
        path = RunDir(run_dir).stage(stage).layer_choice
        if path.is_file():
            return path
    return None


def read_layer_choice(path: Path) -> dict:
    """The record at `path`, checked: a JSON object whose `choice` is a list of layer indices and which
    names the request it answers; one line naming the file otherwise."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable layer-choice record ({' '.join(str(err).split())}); delete it "
                        "or re-run the stage that chose with --force") from None
    choice = record.get("choice") if isinstance(record, dict) else None
    if not (isinstance(choice, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in choice)
            and all(key in record for key in REQUEST_KEYS)):
        raise UserError(f"{path} is not a layer-choice record (a JSON object with a list of layer indices under "
                        f"'choice' and the keys {', '.join(REQUEST_KEYS)}); delete it or re-run the stage that "
                        "chose with --force")
    return record


def choose_softmax_layers(cfg, run_dir: Path) -> dict:
    """The selector's record for cfg: scored on a throwaway model converted in every candidate layer,
    probing with the transfer stage's optimizer settings on the run's data, and held out: the first rows
    of its in-stage eval, as many as the probe trains on (at least one), so scoring costs about a third
    of the probe (forwards only)."""
    seed_everything(cfg.seed)
    model, tokenizer = load_converted(replace(cfg, attention=replace(cfg.attention, softmax_layers=[])))
    train_tokens, eval_tokens = run_datasets(cfg, tokenizer, run_dir, model)
    stage_cfg = cfg.attention_transfer
    probe_rows = max(1, cfg.attention.selection_steps * stage_cfg.micro_batch_size)
    held_out = in_stage_eval(eval_tokens, stage_cfg)[:probe_rows]
    recall = ()
    if SELECTORS[cfg.attention.softmax_layer_selector].reads_recall:  # held out: a stream the source never uses
        recall = tuple(recall_examples(tokenizer, RECALL_PROBE_EXAMPLES, cfg.data.seq_len, seed=cfg.seed,
                                       queries=cfg.data.recall.queries, min_distance=cfg.data.recall.min_distance))
    probe = Probe(train=train_tokens, held_out=held_out, steps=cfg.attention.selection_steps,
                  lr=stage_cfg.lr, micro_batch_size=stage_cfg.micro_batch_size, grad_clip=stage_cfg.grad_clip,
                  mse_factor=stage_cfg.mse_factor, recall=recall, recall_weight=cfg.attention.selector_recall_weight)
    return select_softmax_layers(model, cfg.attention.softmax_layer_selector, cfg.attention.softmax_layer_count, probe)


def ensure_choice(cfg, run_dir: Path, stage: str) -> None:
    """With `attention.softmax_layers: auto` and no recorded choice, runs the selector and records it in
    `<run>/<stage>/` (with the per-layer score plot), saying which layers it chose. Main process only."""
    if cfg.attention.softmax_layers != AUTO or find_layer_choice(run_dir) is not None:
        return
    record = choose_softmax_layers(cfg, run_dir)
    stage_dir = RunDir(run_dir).stage(stage)
    stage_dir.path.mkdir(parents=True, exist_ok=True)
    plot_layer_scores(record, stage_dir.layer_choice_plot)
    path = stage_dir.layer_choice
    write_json(path, record)
    print(f"{stage}: softmax layers {record['choice']} chosen by {record['selector']} from "
          f"{len(record['candidates'])} candidate layers (scores in {path})")


def recorded_choice(cfg, run_dir: Path) -> tuple[list[int], Path]:
    """(the recorded layers, the record's path) for cfg's request; UserError when none is recorded or the
    record answers another request (selector, count or probe steps)."""
    path = find_layer_choice(run_dir)
    if path is None:
        raise UserError(f"attention.softmax_layers=auto but {run_dir} holds no layer choice yet: run the pipeline "
                        "(`linearize run`), which chooses before the first stage")
    record = read_layer_choice(path)
    changed = [key for key, name in REQUEST_KEYS.items() if record.get(key) != getattr(cfg.attention, name)]
    if changed:
        asked = ", ".join(f"attention.{REQUEST_KEYS[k]}={getattr(cfg.attention, REQUEST_KEYS[k])} "
                          f"(recorded {record.get(k)})" for k in changed)
        raise UserError(f"{path} was chosen for other values: {asked}; re-run the stage that chose "
                        f"({path.parent.name}) with --force to choose again")
    return list(record["choice"]), path


def applied(cfg, run_dir: Path):
    """cfg itself, or with `attention.softmax_layers: auto`, a config holding the recorded choice."""
    if cfg.attention.softmax_layers != AUTO:
        return cfg
    layers, _ = recorded_choice(cfg, run_dir)
    return replace(cfg, attention=replace(cfg.attention, softmax_layers=layers))
