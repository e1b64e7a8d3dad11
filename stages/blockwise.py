"""Block-wise attention transfer (`attention_transfer.block_size: K > 0`): the stage-1 recipe run on blocks
of K decoder layers, each block a sub-stage with only its layers in memory (LoLCATs' recipe for teachers
that do not fit; ../shared/METHODS.md §10).

Why it is exact: in transfer mode every converted layer receives the teacher's own input and its loss
depends only on its own parameters, so block by block computes the same per-layer gradients as all at
once, as long as each layer keeps its loss weight (1 / all converted layers) and gradients are clipped per
block or not at all. Every block starts from the same seeded RNG state, and every initial student comes
from one `linearize.surgery.initial_students` call made right after seeding, as the all-at-once stage
builds them.

Per block b (layers `blocks[b]`), under `<stage_dir>/block_<b>/`: the same steps as a stage: surgery
(`linearize_model` on the loaded layers, from their initial students), calibration, `train_stage` with the
transfer objective on the teacher's hidden states at the block's input (`train.hidden_cache`), the block's
student file, then its DONE record (config checked on resume as a stage's is). Blocks are spread over the
launched ranks (block b on rank b % world); rank 0 joins the block students into the stage's student."""
from __future__ import annotations

import dataclasses
import datetime
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file

import linearize
from linearize.data import in_stage_eval
from linearize.dtypes import torch_dtype
from linearize.errors import UserError
from linearize.files import write_jsonl
from linearize.losses import transfer_objective
from linearize.models.lazy import LazyDecoder, SafetensorsReader
from linearize.models.fingerprint import teacher_fingerprint
from linearize.models.teacher import resolve_model_path
from linearize.surgery import (build_students, calibrate, calibration_rows, check_run_options, initial_students,
                               selected_layers)
from linearize.train.checkpoint import latest_checkpoint
from linearize.train.distributed import DistributedSettings, barrier
from linearize.train.engine import default_device
from linearize.train.hidden_cache import GB, BlockInputs, CachePlan, HiddenCache, cache_dtype, plan_cache, wanted_rows
from linearize.train.metrics import MetricsLog, plot_metrics
from linearize.train.state import seed_everything
from linearize.train.student import check_context, save_student

from .common import StageStart, record_calibration, train_stage
from .teacher_data import run_datasets
from .rundir import BLOCK_PREFIX, StageDir, mark_done, read_done, same_config_as_done

# Ranks wait at barriers while rank peers build their share of the hidden-state cache or train a block.
BLOCK_RANK_TIMEOUT = datetime.timedelta(hours=24)


def init_block_ranks(settings: Optional[DistributedSettings] = None) -> DistributedSettings:
    """A process group for ranks that share the blocks of a block-wise stage 1 under the single engine
    (torchrun's RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): gloo, used for barriers only."""
    settings = settings or DistributedSettings.from_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(settings.local_rank)  # each rank trains its blocks on its own device
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", rank=settings.rank, world_size=settings.world_size,
                                             timeout=BLOCK_RANK_TIMEOUT)
    return settings


def block_dirs(stage_dir: Path) -> list[Path]:
    """The block folders a block-wise stage wrote, in block order (none for an all-at-once stage)."""
    found = {int(p.name[len(BLOCK_PREFIX):]): p for p in Path(stage_dir).glob(f"{BLOCK_PREFIX}*")
             if p.is_dir() and p.name[len(BLOCK_PREFIX):].isdigit()}
    return [found[b] for b in sorted(found)]


def layer_blocks(num_layers: int, block_size: int) -> list[list[int]]:
    """Consecutive decoder layers in blocks of `block_size` (the last may be shorter)."""
    return [list(range(first, min(first + block_size, num_layers))) for first in range(0, num_layers, block_size)]


@dataclass
class BlockwiseResult:
    """What `train_blocks` leaves to the stage: the joined student state (rank 0; None elsewhere), the
    stage's metrics, or the reason there was nothing to train."""

    student: Optional[dict[str, torch.Tensor]]
    metrics: dict
    skipped: Optional[str] = None


@dataclass
class _Blocks:
    """What every block of one stage shares: the stage's start, the teacher's files and the student's
    initial parameters, the token rows, and the hidden-state cache."""

    start: StageStart
    accept_changes: bool
    reader: SafetensorsReader
    dtype: torch.dtype
    converted: list[int]
    initial: dict
    data: tuple[torch.Tensor, torch.Tensor]
    cache: Optional[HiddenCache] = None
    plan: Optional[CachePlan] = None
    rank: int = 0
    log: Callable[[str], None] = lambda line: print(line)  # print as it is when called, not at import
    hidden_size: int = 0
    embed_name: str = ""


def train_blocks(start: StageStart, accept_changes: bool = False,
                 log: Optional[Callable[[str], None]] = None) -> BlockwiseResult:
    """Trains the student of `start.cfg` block by block (see the module docstring). `start.model` is None:
    the whole teacher is never built; `start.cfg` already holds the run's softmax layers."""
    log = log or print  # looked up now, not bound at import
    cfg, settings = start.cfg, DistributedSettings.from_env()
    reader = SafetensorsReader.for_model(resolve_model_path(cfg.model.path))
    dtype = torch_dtype(cfg.model.dtype)
    lazy = LazyDecoder(reader, dtype)
    check_context(cfg, lazy)
    check_run_options(cfg.attention)
    converted = selected_layers(cfg.attention, lazy.num_layers)
    seed_everything(cfg.seed)
    initial = initial_students(cfg.attention, lazy.config.get_text_config(decoder=True), converted)
    if not any(t.numel() for state in initial.values() for t in state.values()):
        return BlockwiseResult(None, {}, skipped=f"{cfg.attention.mechanism} adds no trainable parameters")
    train_tokens, eval_tokens = run_datasets(cfg, start.tokenizer, start.stage_dir.parent, lazy)
    text_cfg = lazy.config.get_text_config(decoder=True)
    run = _Blocks(start, accept_changes, reader, dtype, converted, initial, (train_tokens, eval_tokens),
                  rank=settings.rank, log=log, hidden_size=text_cfg.hidden_size, embed_name=lazy.embed_name)
    blocks = layer_blocks(lazy.num_layers, cfg.attention_transfer.block_size)
    _prepare_cache(run, blocks, settings, _calibration_tokens(cfg.attention, text_cfg))
    trainable = [b for b, layers in enumerate(blocks) if set(layers) & set(converted)]
    for b in trainable:
        if b % settings.world_size == settings.rank:
            _train_block(run, lazy, b, blocks[b], len(blocks))
    barrier()  # every block is trained before rank 0 joins them
    if not settings.is_main:
        return BlockwiseResult(None, {})
    stage_dir = start.stage_dir
    metrics = combine_metrics(stage_dir, trainable, stage_dir.name)
    student = join_students(stage_dir, trainable, converted)
    cache = StageDir(stage_dir).cache
    freed = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    shutil.rmtree(cache, ignore_errors=True)
    if freed:
        log(f"{stage_dir.name}: all blocks trained; removed the {freed / GB:.3g} GB hidden-state cache")
    return BlockwiseResult(student, {**metrics, "blocks": len(blocks), "block_size": cfg.attention_transfer.block_size})


def _prepare_cache(run: _Blocks, blocks: list[list[int]], settings, calibration_wanted: int) -> None:
    """The teacher's hidden states at every block's input, for the rows training, in-stage eval and
    calibration read, within the disk budget (`plan_cache`); built once, shared by the ranks."""
    cfg, stage_cfg = run.start.cfg, run.start.cfg.attention_transfer
    train_tokens, eval_tokens = run.data
    first_rows = calibration_rows(calibration_wanted, train_tokens) if calibration_wanted else 0
    rows = wanted_rows(train_tokens, in_stage_eval(eval_tokens, stage_cfg), stage_cfg, cfg.seed, cfg.data.shuffle,
                       first_rows)
    dtype = cache_dtype(stage_cfg.cache_dtype, run.dtype)
    # The teacher's files by content (cached hashes): a teacher replaced at the same path is another cache.
    teacher = teacher_fingerprint(cfg.model.path, cfg.model.tokenizer)["digest"]
    identity = {"model": str(run.reader.model_dir), "teacher": teacher, "model_dtype": cfg.model.dtype,
                "autocast": stage_cfg.autocast}
    run.cache = HiddenCache(StageDir(run.start.stage_dir).cache, rows, dtype, identity)
    run.plan = plan_cache([layers[0] for layers in blocks], len(rows), rows.shape[1], run.hidden_size, dtype,
                          int(stage_cfg.cache_gb * GB))
    if run.plan.starts:
        run.log(f"{run.start.stage_dir.name}: {run.plan.summary()}")
    builder = LazyDecoder(run.reader, run.dtype)  # a plain teacher, apart from the student being trained
    run.cache.build(builder, blocks, run.plan, batch_size=stage_cfg.micro_batch_size, autocast=stage_cfg.autocast,
                    device=default_device(), rank=settings.rank, world=settings.world_size, barrier=barrier)


def _calibration_tokens(attention_cfg, text_cfg) -> int:
    """The calibration tokens a converted layer's student asks for (0: none), read from a throwaway student,
    since the whole model is never built."""
    with torch.random.fork_rng(devices=[]):  # asking draws nothing from the run's random stream
        students = build_students(attention_cfg, text_cfg, [0])
    return students[0].calibration_tokens()


def _block_inputs(run: _Blocks, start: int, device: torch.device) -> BlockInputs:
    """The teacher's hidden states at layer `start`: stored, or recomputed from the nearest stored
    boundary below (or the embeddings) through a teacher prefix holding the layers in between."""
    source = run.plan.nearest_stored(start) if start > 0 else None
    first = source if source is not None else 0
    prefix = None
    if first < start:
        prefix = LazyDecoder(run.reader, run.dtype)
        prefix.load(range(first, start))
        prefix.to(device)
    embeddings = run.reader.read(run.embed_name, run.dtype).to(device) if source is None else None
    return BlockInputs(run.cache, source, prefix, embeddings, run.dtype, run.hidden_size)


def _finished(run: _Blocks, folder: Path) -> bool:
    """A block finished under this config (its DONE record and student file are there); a changed config
    is refused naming the keys, as for a stage, unless accept_changes, which continues the block from its
    last checkpoint."""
    done = read_done(folder)
    if done is None or not StageDir(folder).student.is_file():
        return False
    stage = run.start.stage_dir.name
    return not same_config_as_done(done, run.start.config, stage, StageDir(folder).done, run.accept_changes)


def _train_block(run: _Blocks, lazy: LazyDecoder, b: int, layers: list[int], num_blocks: int) -> None:
    folder, stage = StageDir(run.start.stage_dir).block(b).path, run.start.stage_dir.name
    if _finished(run, folder):
        run.log(f"{stage}: block {b + 1}/{num_blocks} (layers {layers[0]}-{layers[-1]}) done, skipping")
        return
    run.log(f"{stage}: block {b + 1}/{num_blocks} (layers {layers[0]}-{layers[-1]})")
    cfg = run.start.cfg
    seed_everything(cfg.seed)  # every block starts from the same RNG state, whichever ran before it
    lazy.load(layers)
    converted = [idx for idx in layers if idx in run.converted]
    linearize.linearize_model(lazy, cfg.attention, layers=converted, initial=run.initial)
    linearize.freeze_for_transfer(lazy)
    device = default_device()
    lazy.to(device)
    inputs = _block_inputs(run, layers[0], device)
    folder.mkdir(parents=True, exist_ok=True)
    block = dataclasses.replace(run.start, stage_dir=folder, model=lazy,
                                # a block is small: plain AdamW per rank, whatever the stage's engine
                                cfg=dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, name="single")))
    if latest_checkpoint(folder) is None:
        record_calibration(folder, calibrate(lazy, run.data[0], cfg.attention.init, forward=lambda rows: lazy(inputs(rows))))
    stage_cfg = cfg.attention_transfer
    loss_fn = transfer_objective(stage_cfg.mse_factor, stage_cfg.attn_ce_weight, inputs=inputs,
                                 num_layers=len(run.converted))
    metrics = train_stage(block, lazy, loss_fn, stage_cfg, run.accept_changes, data=run.data, stage=stage)
    save_student(lazy, StageDir(folder).student)
    mark_done(folder, {**metrics, "layers": layers, "rank": run.rank}, run.start.config)
    linearize.unlinearize_model(lazy)
    lazy.release(layers)


def join_students(stage_dir: Path, blocks: list[int], converted: list[int]) -> dict[str, torch.Tensor]:
    """The whole student: every trained block's parameters (full-model names) in one state dict. Refuses a
    join that lacks a converted layer (a block file from another config)."""
    joined: dict[str, torch.Tensor] = {}
    for b in blocks:
        joined.update(load_file(StageDir(stage_dir).block(b).student))
    missing = [idx for idx in converted if not any(f".layers.{idx}." in name for name in joined)]
    if missing:
        raise UserError(f"the block students in {stage_dir} lack converted layer(s) {missing}: re-run the stage "
                        "with --force")
    return joined


def combine_metrics(stage_dir: Path, blocks: list[int], stage: str) -> dict:
    """The stage's `metrics.jsonl` and plot from the blocks' logs: per step the summed loss (each layer
    weighs 1 / all converted layers, so this is the all-at-once loss), the global grad norm and the
    all-at-once throughput; returns the final metrics every training stage records."""
    logs = [{r["step"]: r for r in MetricsLog(StageDir(stage_dir).block(b).metrics).read()} for b in blocks]
    steps = sorted(set.intersection(*(set(log) for log in logs))) if logs else []
    records = []
    for step in steps:
        rows = [log[step] for log in logs]
        record = {"step": step, "loss": sum(r["loss"] for r in rows), "lr": rows[0]["lr"], "tokens": rows[0]["tokens"],
                  "grad_norm": math.sqrt(sum((r.get("grad_norm") or 0.0) ** 2 for r in rows)),
                  "tokens_per_s": 1.0 / sum(1.0 / max(r["tokens_per_s"], 1e-12) for r in rows)}
        if all(r.get("eval_loss") is not None for r in rows):
            record["eval_loss"] = sum(r["eval_loss"] for r in rows)
        records.append(record)
    write_jsonl(StageDir(stage_dir).metrics, records)
    plot_metrics(records, StageDir(stage_dir).loss_plot, stage)
    final = records[-1] if records else {}
    last_eval = next((r["eval_loss"] for r in reversed(records) if r.get("eval_loss") is not None), None)
    return {"step": final.get("step", 0), "loss": final.get("loss"), "eval_loss": last_eval,
            "tokens": final.get("tokens", 0), "plot": StageDir(stage_dir).loss_plot.name}

