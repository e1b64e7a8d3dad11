"""`<run>/report.md`: what each stage did, its final metrics, the automatic softmax layer choice, the
evaluation table, the samples, and links to the PNGs (relative, so the run directory can be moved or
shared)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from linearize.evals.report import branch_shares_markdown
from linearize.files import write_text

from .behaviour import summary_lines
from .layer_choice import find_layer_choice
from .rundir import LAYER_CHOICE_PLOT, REPORT_FILE, RUN_CONFIG, RunDir  # noqa: F401  (REPORT_FILE: older importers)

TRAIN_COLUMNS = ("step", "loss", "eval_loss", "tokens")
EVAL_ROWS = (("teacher perplexity", "teacher_ppl"), ("student perplexity", "student_ppl"),
             ("KL(teacher ‖ student) per token", "kl"), ("top-1 agreement", "top1_agreement"))


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _stage_table(statuses: dict, results: dict) -> list[str]:
    lines = ["| stage | status | " + " | ".join(TRAIN_COLUMNS) + " |", "|---" * (len(TRAIN_COLUMNS) + 2) + "|"]
    for stage, status in statuses.items():
        metrics = results.get(stage) or {}
        if "skipped" in metrics:  # the DONE metrics of a stage that had nothing to do
            status = f"skipped: {metrics['skipped']}"
        lines.append(f"| {stage} | {status} | " + " | ".join(_fmt(metrics.get(c)) for c in TRAIN_COLUMNS) + " |")
    return lines


def _branch_section(shares: dict, stage: str) -> list[str]:
    """The hybrid's branch shares: what they mean, the per-layer table and the stacked bar plot."""
    lines = ["", "### Branch shares", "", f"Share of each converted layer's attention output from the window "
             f"(softmax) branch and from the linear / delta branch, mean over {shares.get('tokens')} held-out "
             "tokens and every head (definitions: docs/attention.md, \"Sinks and branch diagnostics\"). "
             "A layer near 1.0 window has learned to bypass its linear branch.", "", branch_shares_markdown(shares)]
    if shares.get("plot"):
        lines += ["", f"![branch shares]({stage}/{shares['plot']})"]
    return lines


def _layer_choice_section(run_dir: Path) -> list[str]:
    """`attention.softmax_layers: auto`: the chosen layers, how, and the per-layer score plot."""
    path = find_layer_choice(run_dir)
    if path is None:
        return []
    record = json.loads(path.read_text())
    lines = ["", "## Softmax layers", "", f"`{record['selector']}` chose layers {record['choice']} of "
             f"{len(record['candidates'])} candidates to keep softmax attention (the {record['layers']} highest "
             f"scores; record: [{path.relative_to(run_dir)}]({path.relative_to(run_dir)}))."]
    plot = path.parent / LAYER_CHOICE_PLOT
    if plot.is_file():
        lines += ["", f"![softmax layer scores]({plot.relative_to(run_dir)})"]
    return lines


def _eval_section(evaluation: dict) -> list[str]:
    lines = ["## Evaluation", "", f"{evaluation.get('sequences')} held-out sequences, "
             f"{evaluation.get('tokens')} tokens.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {_fmt(evaluation.get(key))} |" for label, key in EVAL_ROWS]
    samples = evaluation.get("samples") or {}
    if samples:
        lines += ["", f"Greedy continuations of `{samples.get('prompt')}`:", ""]
        lines += [f"- {who}: `{samples[who]!r}`" for who in ("teacher", "student") if who in samples]
    if evaluation.get("branch_shares"):
        lines += _branch_section(evaluation["branch_shares"], "evaluate")
    if evaluation.get("teacher_agreement"):
        lines += ["", "## Behaviour", "", "Closeness to the teacher and its behaviours (docs/behaviour.md):", ""]
        lines += [f"- {line}" for line in summary_lines(evaluation)]
    return lines


def write_report(run_dir: Path, statuses: dict, results: dict, export_sample: Optional[str] = None) -> Path:
    """statuses: stage → "ran" / "resumed from step k" / "skipped (done)"; results: stage → metrics
    (`{"skipped": reason}` for a stage that had nothing to do)."""
    run_dir = Path(run_dir)
    lines = [f"# Run `{run_dir.name}`", "", f"Resolved config: [{RUN_CONFIG}]({RUN_CONFIG})", "", "## Stages", ""]
    lines += _stage_table(statuses, results)
    lines += _layer_choice_section(run_dir)
    if results.get("evaluate"):
        lines += [""] + _eval_section(results["evaluate"])
    if results.get("export"):
        lines += ["", "## Export", "", f"`{results['export'].get('path')}`"]
        if export_sample is not None:
            lines += ["", f"Generation from the export: `{export_sample!r}`"]
    plots = [(stage, run_dir / stage / m["plot"]) for stage, m in results.items() if m and m.get("plot")]
    if plots:
        lines += ["", "## Loss curves", ""]
        lines += [f"![{stage}]({path.relative_to(run_dir)})" for stage, path in plots if path.exists()]
    return write_text(RunDir(run_dir).report, "\n".join(lines) + "\n")
