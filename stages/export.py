"""Stage 4, export: the run's final student (LoRA merged unless export.merge_lora=false) as a
self-describing Hugging Face directory `<run>/export/` that `load_export` (or plain transformers with
trust_remote_code) rebuilds alone; the stage's DONE record sits beside the model files."""
from __future__ import annotations

from pathlib import Path

from linearize import adapters
from linearize.errors import UserError
from linearize.models.exported import save_export
from linearize.train import config_to_dict

from .common import attach_adapter, start_stage
from .rundir import adapter_dir, mark_done

STAGE = "export"
RUN_CONFIG = "config.yaml"


def export_dir(run_dir: Path) -> Path:
    return Path(run_dir) / STAGE


def _within(path: Path, folder: Path) -> bool:
    """True if `path` is `folder` or inside it (both resolved, so `..` and symlinks cannot hide it)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_destination(run_dir: Path, out_dir: Path) -> None:
    """An export replaces OUT as a whole: refuse an OUT that is the run, the working directory, or a
    folder holding either (even with --overwrite: that would delete them)."""
    for name, folder in (("the run directory", Path(run_dir)), ("the working directory", Path.cwd())):
        if _within(folder, Path(out_dir)):
            what = "is" if Path(out_dir).resolve() == folder.resolve() else "contains"
            raise UserError(f"export destination {out_dir} {what} {name} ({folder}); choose a new folder")


def export_run(run_dir: Path, out_dir: Path, cfg=None, overwrite: bool = False) -> dict:
    """Exports the run in `run_dir` (its config.yaml unless `cfg` is given) to `out_dir`; returns what
    was written: path, dtype, merged_lora (an adapter was merged into the weights), adapter_shipped
    (an unmerged adapter sits beside them). overwrite: replace an `out_dir` that is not an export."""
    run_dir = Path(run_dir)
    check_destination(run_dir, out_dir)
    if cfg is None:
        from stages.config_loader import load_config

        if not (run_dir / RUN_CONFIG).is_file():
            raise UserError(f"{run_dir} is not a run directory (no {RUN_CONFIG})")
        cfg = load_config(run_dir / RUN_CONFIG)
    start = start_stage(cfg, run_dir, STAGE)
    model, adapter = start.model, adapter_dir(run_dir)
    merged = bool(cfg.export.merge_lora and adapter is not None)
    if merged:
        model = adapters.merge(attach_adapter(model, run_dir))
    dtype = cfg.export.dtype or cfg.model.dtype
    shipped = adapter if adapter is not None and not merged else None
    path = save_export(model, start.tokenizer, out_dir, dtype=dtype, run_config=start.config,
                       adapter_dir=shipped, overwrite=overwrite)
    return {"path": str(path), "dtype": dtype, "merged_lora": merged, "adapter_shipped": shipped is not None}


def run(cfg, run_dir: Path, accept_changes: bool = False) -> dict:
    """Writes the export and returns what it holds. The stage owns `<run>/export/` (it carries the stage
    marker), so it replaces it."""
    metrics = export_run(run_dir, export_dir(run_dir), cfg, overwrite=True)
    metrics["path"] = STAGE  # relative to the run: the record sits in the export, which gets shared
    mark_done(export_dir(run_dir), metrics, config_to_dict(cfg), stage=STAGE)
    return metrics
