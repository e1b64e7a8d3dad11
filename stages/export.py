"""Stage 4, export: the run's final student (LoRA merged unless export.merge_lora=false) as a
self-describing Hugging Face directory `<run>/export/` that `load_export` (or plain transformers with
trust_remote_code) rebuilds alone; the stage's DONE record sits beside the model files."""
from __future__ import annotations

from pathlib import Path

from linearize.errors import UserError
from linearize.models.exported import save_export
from linearize.train import config_to_dict, mark_done
from linearize.train.student import ADAPTER_DIR, attach_adapter, build_student, merge_lora

STAGE = "export"
RUN_CONFIG = "config.yaml"


def export_dir(run_dir: Path) -> Path:
    return Path(run_dir) / STAGE


def export_run(run_dir: Path, out_dir: Path, cfg=None) -> Path:
    """Exports the run in `run_dir` (its config.yaml unless `cfg` is given) to `out_dir`."""
    run_dir = Path(run_dir)
    if cfg is None:
        from stages.config_loader import load_config

        if not (run_dir / RUN_CONFIG).is_file():
            raise UserError(f"{run_dir} is not a run directory (no {RUN_CONFIG})")
        cfg = load_config(run_dir / RUN_CONFIG)
    model, tokenizer, _ = build_student(cfg, run_dir)
    adapter = run_dir / "lora_recovery" / ADAPTER_DIR
    if cfg.export.merge_lora:
        model = merge_lora(attach_adapter(model, run_dir))
    dtype = cfg.export.dtype or cfg.model.dtype
    return save_export(model, tokenizer, out_dir, dtype=dtype, run_config=config_to_dict(cfg),
                       adapter_dir=adapter if adapter.is_dir() and not cfg.export.merge_lora else None)


def run(cfg, run_dir: Path, force: bool = False) -> dict:
    """Writes the export and returns where it went."""
    out = export_run(run_dir, export_dir(run_dir), cfg)
    metrics = {"path": str(out), "dtype": cfg.export.dtype or cfg.model.dtype, "merged_lora": cfg.export.merge_lora}
    mark_done(Path(run_dir) / STAGE, metrics, config_to_dict(cfg))
    return metrics
