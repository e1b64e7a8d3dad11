"""Stage 4, export: the run's final student (LoRA merged unless export.merge_lora=false) as a Hugging Face
directory `<run>/export/`, in the format `export.format` names (`FORMATS`): `linearize`, self-describing
(`load_export`, or plain transformers with trust_remote_code); or a serving family (`qwen3_5`: a plain
`Qwen3_5ForCausalLM` checkpoint, no remote code, for a native-form student). The stage's DONE record sits
beside the model files."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from linearize import adapters
from linearize.errors import UserError
from linearize.files import write_text
from linearize.models.exported import save_export
from linearize.models.families import qwen3_5
from linearize.train import config_to_dict

from .common import attach_adapter, start_stage
from .rundir import CompareDir, RunDir, adapter_dir, check_teacher, enclosing_run, mark_done

STAGE = "export"
# Folders an export publish leaves only when killed: `.<name>.tmp-*` (being written), `.<name>.old-*` (the
# previous export, about to be deleted). Neither is ever read.
DEBRIS = ("tmp", "old")


def export_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).export


def remove_export_debris(out_dir: Path) -> list[Path]:
    """Deletes what a killed export to `out_dir` left beside it; only under the run lock (the stage), where
    no other export to that folder can be running."""
    out_dir = Path(out_dir)
    removed = []
    for kind in DEBRIS:
        for leftover in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(leftover)
    return removed


def _within(path: Path, folder: Path) -> bool:
    """True if `path` is `folder` or inside it (both resolved, so `..` and symlinks cannot hide it)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_destination(run_dir: Path, out_dir: Path) -> None:
    """An export replaces OUT as a whole: refuse an OUT that is the run, the working directory, or a
    folder holding either, a compare folder, or a folder inside any run directory other than this run's
    own `export/` (even with --overwrite: that would delete what linearize or the user keeps there)."""
    out_dir = Path(out_dir)
    for name, folder in (("the run directory", Path(run_dir)), ("the working directory", Path.cwd())):
        if _within(folder, out_dir):
            what = "is" if out_dir.resolve() == folder.resolve() else "contains"
            raise UserError(f"export destination {out_dir} {what} {name} ({folder}); choose a new folder")
    own = RunDir(run_dir).export
    inside = enclosing_run(out_dir)
    if inside is not None and out_dir.resolve() != own.resolve():
        raise UserError(f"export destination {out_dir} is inside the run directory {inside.root}; a run keeps its "
                        f"export in {RunDir(inside.root).export}: choose a folder outside any run")
    if CompareDir(out_dir).is_compare():
        raise UserError(f"export destination {out_dir} is a linearize compare folder; choose a new folder")


def export_run(run_dir: Path, out_dir: Path, cfg=None, overwrite: bool = False, format: str | None = None) -> dict:
    """Exports the run in `run_dir` (its config.yaml unless `cfg` is given) to `out_dir` in `format`
    (default: cfg.export.format); returns what was written: path, format, dtype, merged_lora (an adapter
    was merged into the weights), adapter_shipped (an unmerged adapter sits beside them), and for a family
    format its measured logit parity. overwrite: replace an `out_dir` that is not an export."""
    run_dir = Path(run_dir)
    check_destination(run_dir, out_dir)
    if cfg is None:
        from stages.config_loader import load_config

        run = RunDir(run_dir)
        if not run.config.is_file():
            raise UserError(f"{run_dir} is not a run directory (no {run.config.name})")
        cfg = load_config(run.config)
        check_teacher(run, cfg.model)  # the stage's own run was checked by the pipeline
    format = format or cfg.export.format
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; valid: {', '.join(FORMATS)}")
    check, write = FORMATS[format]
    check(cfg)  # refusals that need only the config come before the model is built
    start = start_stage(cfg, run_dir, STAGE)
    model, adapter = start.model, adapter_dir(run_dir)
    merged = bool(cfg.export.merge_lora and adapter is not None)
    if merged:
        model = adapters.merge(attach_adapter(model, run_dir))
    dtype = cfg.export.dtype or cfg.model.dtype
    shipped = adapter if adapter is not None and not merged else None
    result = write(model, start, out_dir, dtype, shipped, overwrite)
    return {"path": str(out_dir), "format": format, "dtype": dtype, "merged_lora": merged,
            "adapter_shipped": shipped is not None, **result}


def check_nothing(cfg) -> None:
    pass


def write_linearize(model, start, out_dir: Path, dtype: str, shipped, overwrite: bool) -> dict:
    save_export(model, start.tokenizer, out_dir, dtype=dtype, run_config=start.config, adapter_dir=shipped,
                overwrite=overwrite)
    return {}


def check_qwen3_5(cfg) -> None:
    """The refusals the run's config already decides: a student that is not native-form gated_delta (the
    message names its mechanism), and a student with no softmax layer."""
    attention = cfg.attention
    if attention.mechanism != qwen3_5.MECHANISM or attention.native_family != qwen3_5.FAMILY:
        form = " without attention.native_family: qwen3_5" if attention.mechanism == qwen3_5.MECHANISM else ""
        raise UserError(f"export --format qwen3_5 needs a native-form gated_delta student; this run's mechanism "
                        f"is {attention.mechanism}{form}")
    if attention.softmax_layers == [] and attention.layers is None:
        raise UserError("export --format qwen3_5 needs at least one softmax (full-attention) layer; this run "
                        "converted every layer")


# Tokens of the parity check written into the model card: a fixed pseudo-random row, short enough for CPU.
PARITY_TOKENS = 64


def write_qwen3_5(model, start, out_dir: Path, dtype: str, shipped, overwrite: bool) -> dict:
    if shipped is not None:
        raise UserError("export --format qwen3_5 merges the LoRA adapter into the weights; set export.merge_lora=true")
    model = model.float().eval()
    source = start.cfg.model.path
    card = qwen3_5.model_card(source, start.config, model, None)
    qwen3_5.save(model, start.tokenizer, out_dir, dtype=dtype, card=card, overwrite=overwrite)
    ids = torch.randint(0, model.config.vocab_size, (1, PARITY_TOKENS), generator=torch.Generator().manual_seed(0))
    parity = qwen3_5.logit_parity(model, out_dir, ids)
    write_text(Path(out_dir) / "README.md", qwen3_5.model_card(source, start.config, model, parity))
    return {"parity": parity}


# export.format -> (config-time check, writer).
FORMATS = {"linearize": (check_nothing, write_linearize), "qwen3_5": (check_qwen3_5, write_qwen3_5)}


def run(cfg, run_dir: Path, accept_changes: bool = False) -> dict:
    """Writes the export and returns what it holds. The stage owns `<run>/export/` (it carries the stage
    marker), so it replaces it."""
    for leftover in remove_export_debris(export_dir(run_dir)):
        print(f"{STAGE}: removed {leftover.name}, left by an export that was interrupted")
    metrics = export_run(run_dir, export_dir(run_dir), cfg, overwrite=True)
    metrics["path"] = STAGE  # relative to the run: the record sits in the export, which gets shared
    mark_done(export_dir(run_dir), metrics, config_to_dict(cfg), stage=STAGE)
    return metrics
