"""Stage 3, evaluation: teacher and student perplexity on the same held-out tokens, teacher–student KL
and top-1 agreement, and a greedy sample from each → `<run>/evaluate/eval.json`.

`evaluate_target` serves `linearize eval` on a run directory or an export directory."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from linearize.adapters import teacher_view
from linearize.data import LOCAL_FORMATS, build_datasets, load_texts, pack_sequences
from linearize.errors import UserError
from linearize.files import write_json
from linearize.evals import run_long_context
from linearize.evals.branches import branch_shares
from linearize.evals.long_context import enabled as long_context_enabled
from linearize.evals.report import BRANCH_PLOT_FILE, plot_branch_shares
from linearize.models.exported import CONFIG_FILE as EXPORT_CONFIG, RUN_CONFIG_FILE, is_export_dir, load_export
from linearize.train import default_device
from linearize.train.evaluation import compare_on_tokens, greedy_sample

from .behaviour import behaviour_metrics
from .common import StageStart, attach_adapter, finish_stage, start_stage
from .rundir import TEACHER_DIR, RunDir, StageDir

STAGE = "evaluate"
# Held-out rows the branch shares are averaged over (a second student pass over them, with the `[T, T]`
# weights for window_linear): the first rows of the evaluation set.
BRANCH_SEQUENCES = 8


def eval_tokens(cfg, tokenizer):
    """Held-out rows `[M, L]`. With data.eval set, only that source is read: an export evaluated on
    another machine need not have the run's training data."""
    if cfg.data.eval:
        texts = load_texts(cfg.data.eval, cfg.data.text_field)
        held_out = pack_sequences(texts, tokenizer, cfg.data.seq_len, source=f"data.eval {cfg.data.eval!r}")
    else:
        _, held_out = build_datasets(cfg.data, tokenizer, cfg.seed)
    return held_out[: min(cfg.data.max_eval_sequences, cfg.evaluate.max_sequences)]


def _position_tokens(cfg, tokenizer):
    """`[M, position_seq_len]` rows of data.eval for perplexity by position, or None when off."""
    lc = cfg.evaluate.long_context
    if lc.position_seq_len <= 0:
        return None
    if not cfg.data.eval:
        raise UserError("evaluate.long_context.position_seq_len needs data.eval (a held-out file or corpus)")
    texts = load_texts(cfg.data.eval, cfg.data.text_field)
    rows = pack_sequences(texts, tokenizer, lc.position_seq_len, source=f"data.eval {cfg.data.eval!r}")
    return rows[: lc.position_sequences]


def evaluate_model(cfg, model, tokenizer, with_teacher: bool, out_dir: Path | None = None) -> dict:
    """Metrics and greedy samples for `model` (a converted model; with_teacher: its teacher view too);
    with `evaluate.long_context` set, also `long_context` (tables and heatmap written to `out_dir`) and,
    with the teacher, `long_context_teacher`; for hybrid mechanisms, `branch_shares` (its plot written
    to `out_dir`); with the teacher and `evaluate.behaviour.enabled`, `texts`, `retrieval` and
    `teacher_agreement` (`stages/behaviour.py`)."""
    model.to(default_device())
    view = teacher_view if with_teacher else None
    tokens = eval_tokens(cfg, tokenizer)
    metrics = compare_on_tokens(model, tokens, teacher_view=view)
    prompt, length = cfg.evaluate.sample_prompt, cfg.evaluate.sample_tokens
    samples = {"prompt": prompt, "student": greedy_sample(model, tokenizer, prompt, length)}
    if with_teacher:
        with teacher_view(model):
            samples["teacher"] = greedy_sample(model, tokenizer, prompt, length)
    result = {**metrics, "samples": samples}
    shares = _branch_shares(model, tokens, out_dir)
    if shares is not None:
        result["branch_shares"] = shares
    if with_teacher and cfg.evaluate.behaviour.enabled:  # texts, retrieval, teacher_agreement (stages/behaviour.py)
        result.update(behaviour_metrics(cfg, model, tokenizer, held_out=metrics))
    lc = cfg.evaluate.long_context
    if long_context_enabled(lc):
        tokens = _position_tokens(cfg, tokenizer)
        result["long_context"] = run_long_context(lc, model, tokenizer, tokens, out_dir, cfg.seed)
        if with_teacher:  # the same prompts and keys (same seed) for the teacher, beside the student's
            with teacher_view(model):
                result["long_context_teacher"] = run_long_context(
                    lc, model, tokenizer, tokens, Path(out_dir) / TEACHER_DIR if out_dir else None, cfg.seed)
    return result


def _branch_shares(model, tokens, out_dir: Path | None) -> dict | None:
    """Per-layer window / linear (delta) output shares of a hybrid student (None for other mechanisms),
    with the stacked bar plot's file name (in `out_dir`) under "plot"."""
    shares = branch_shares(model, tokens[:BRANCH_SEQUENCES])
    if shares is not None and out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        shares["plot"] = plot_branch_shares(shares, Path(out_dir) / BRANCH_PLOT_FILE).name
    return shares


def final_student(cfg, run_dir: Path) -> StageStart:
    """The evaluate stage's start with the run's final student as its model: the last stage's student
    parameters plus the LoRA adapter (what evaluation, `linearize compare` and bench scripts measure)."""
    start = start_stage(cfg, run_dir, STAGE)
    return replace(start, model=attach_adapter(start.model, run_dir))


def _evaluate_student(start: StageStart, out_dir: Path | None = None) -> dict:
    return evaluate_model(start.cfg, start.model, start.tokenizer, with_teacher=True, out_dir=out_dir or start.stage_dir)


def evaluate_run(cfg, run_dir: Path, out_dir: Path | None = None) -> dict:
    """Builds the run's final student (student parameters + adapter) and evaluates it against its teacher;
    its files (long-context tables, plots) go to `out_dir` (default: `<run>/evaluate/`)."""
    return _evaluate_student(final_student(cfg, run_dir), out_dir)


def run(cfg, run_dir: Path, accept_changes: bool = False) -> dict:
    """Writes `<run>/evaluate/eval.json` (teacher_ppl, student_ppl, kl, top1_agreement, samples)."""
    start = final_student(cfg, run_dir)
    start.stage_dir.mkdir(parents=True, exist_ok=True)
    result = _evaluate_student(start)
    write_json(StageDir(start.stage_dir).eval, result)
    finish_stage(start, {k: v for k, v in result.items() if k != "samples"})
    return result


def _check_export_eval_data(cfg, target: Path) -> None:
    """An export records data.eval by file name only (no local paths travel with it): name the fix when
    that file is not here."""
    spec = cfg.data.eval
    if spec and Path(spec).suffix.lower() in LOCAL_FORMATS and not Path(spec).expanduser().is_file():
        raise UserError(f"{target} records data.eval {spec!r} from the machine that wrote it, and it is not here: "
                        "pass data.eval=FILE")


def evaluate_target(target, overrides=(), out_dir: Path | None = None) -> dict:
    """Evaluates a run directory (against its teacher) or an export directory (student only: the
    export does not carry its teacher) with `key=value` overrides such as `data.eval=FILE`. out_dir: where
    the evaluation's files and `eval.json` go (default: `<target>/evaluate/`, eval.json not written);
    with it a run is only read, so a read-only finished run can be evaluated."""
    from stages.config_loader import config_from_dict, load_config

    target = Path(target)
    if is_export_dir(target):
        cfg = config_from_dict(json.loads((target / RUN_CONFIG_FILE).read_text()), str(target), overrides)
        _check_export_eval_data(cfg, target)
        model, tokenizer = load_export(target)
        result = evaluate_model(cfg, model, tokenizer, with_teacher=False, out_dir=out_dir or target / STAGE)
        return _keep(result, out_dir)
    run = RunDir(target)
    if run.is_run():
        from stages.rundir import check_teacher, run_lock

        cfg = load_config(run.config, overrides)
        if out_dir is not None:  # nothing is written into the run: no lock, which a read-only run could not take
            check_teacher(run, cfg.model)
            return _keep(evaluate_run(cfg, target, Path(out_dir)), out_dir)
        if not os.access(target, os.W_OK):
            raise UserError(f"{target} is read-only and `linearize eval` writes its tables under it: pass --out DIR "
                            "to write the evaluation's files elsewhere")
        with run_lock(target):  # writes long-context tables under <run>/evaluate/
            check_teacher(run, cfg.model)
            return evaluate_run(cfg, target)
    raise UserError(f"{target} is neither a run directory (no {run.config.name}) nor an export (no linearize {EXPORT_CONFIG})")


def _keep(result: dict, out_dir: Path | None) -> dict:
    """Writes `<out_dir>/eval.json` when the evaluation was asked to write elsewhere."""
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(StageDir(Path(out_dir)).eval, result)
    return result
