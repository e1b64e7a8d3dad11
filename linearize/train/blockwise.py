"""Block-wise attention transfer: blocks of `attention_transfer.block_size` decoder layers, each trained on
its own from the teacher's hidden states at its input, with only that block's layers in memory.

Why it is exact: in transfer mode every converted layer receives the teacher's own input and its loss
depends only on its own parameters, so block by block computes the same per-layer gradients as all at
once, as long as each layer keeps its loss weight (1 / all converted layers, `num_layers` in
`losses.transfer`) and gradients are clipped per block or not at all. Every block starts from the same
seeded RNG state and the same initial student parameters as the all-at-once stage builds.

Per block b (layers `blocks[b]`), under `<stage_dir>/block_<b>/`: `train.loop.train`'s checkpoints,
metrics and plot (exact resume after a kill, per block), `calibration.json` when the layers calibrate,
`student.safetensors`, then `result.json` last (its presence marks the block done). Blocks are spread over
ranks (block b on rank b % world); the caller joins the block students (`join_students`) on rank 0.
The teacher's hidden states come from `hidden_cache`; the teacher layers from `models.lazy`."""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

import linearize
from ..attention import LinearizedAttention, RunOptions, build_mechanism
from ..data import build_datasets, in_stage_eval
from ..dtypes import torch_dtype
from ..losses.transfer import PairCollector, attention_ce, transfer_mse
from ..models.lazy import LazyDecoder, SafetensorsReader
from ..models.teacher import resolve_model_path
from ..surgery import check_run_options, decoder_layers, selected_layers, transfer_mode
from .checkpoint import latest_checkpoint
from .distributed import DistributedSettings, barrier
from .engine import default_device
from .hidden_cache import GB, BlockInputs, CachePlan, HiddenCache, cache_dtype, plan_cache, wanted_rows
from .loop import METRICS_FILE, PLOT_FILE, train
from .metrics import MetricsLog, plot_metrics
from .state import check_same_config, seed_everything, write_json_atomic
from .student import check_context, student_state

BLOCK_STUDENT = "student.safetensors"
RESULT_FILE = "result.json"
CALIBRATION_FILE = "calibration.json"
CACHE_DIR = "hidden"


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


BLOCK_PREFIX = "block_"  # <stage_dir>/block_<b>/


def block_dir(stage_dir: Path, block: int) -> Path:
    return Path(stage_dir) / f"{BLOCK_PREFIX}{block}"


def block_dirs(stage_dir: Path) -> list[Path]:
    """The block folders a block-wise stage wrote, in block order (none for an all-at-once stage)."""
    found = {int(p.name[len(BLOCK_PREFIX):]): p for p in Path(stage_dir).glob(f"{BLOCK_PREFIX}*")
             if p.is_dir() and p.name[len(BLOCK_PREFIX):].isdigit()}
    return [found[b] for b in sorted(found)]


def layer_blocks(num_layers: int, block_size: int) -> list[list[int]]:
    """Consecutive decoder layers in blocks of `block_size` (the last may be shorter)."""
    return [list(range(first, min(first + block_size, num_layers))) for first in range(0, num_layers, block_size)]


def initial_mechanisms(attention_cfg, text_cfg, converted: list[int]) -> tuple[dict[int, dict[str, torch.Tensor]], int]:
    """(the student parameters of every converted layer as `linearize_model` initializes them: built in
    layer order from the current RNG state, so call right after seeding, fp32; the most calibration tokens
    any of them asks for)."""
    states, calibration = {}, 0
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    for idx in converted:
        mechanism = build_mechanism(attention_cfg, text_cfg.num_attention_heads, text_cfg.num_key_value_heads,
                                    head_dim, text_cfg.hidden_size).to(torch.float32)
        states[idx] = mechanism.state_dict()
        if hasattr(mechanism, "calibration_tokens"):
            calibration = max(calibration, mechanism.calibration_tokens())
    return states, calibration


def wrap_block(decoder: LazyDecoder, layers: list[int], converted: list[int], attention_cfg,
               initial: dict[int, dict]) -> None:
    """Puts a LinearizedAttention, with its initial student parameters, in front of every converted layer
    of a loaded block (what `linearize_model` does to those layers of the whole model)."""
    _, layout = decoder_layers(decoder)
    text_cfg = decoder.config.get_text_config(decoder=True)
    opts = RunOptions(form=attention_cfg.form, chunk_size=attention_cfg.chunk_size, backend=attention_cfg.backend,
                      compile=attention_cfg.compile)
    for idx in layers:
        if idx not in converted:
            continue
        layer = decoder.decoder.layers[idx]
        base = getattr(layer, layout.attention)
        mechanism = build_mechanism(attention_cfg, text_cfg.num_attention_heads, text_cfg.num_key_value_heads,
                                    base.head_dim, text_cfg.hidden_size).to(torch.float32)
        mechanism.load_state_dict(initial[idx])
        setattr(layer, layout.attention, LinearizedAttention(base, mechanism, idx, opts))


def block_objective(inputs: BlockInputs, mse_factor: float, attn_ce_weight: float, num_layers: int):
    """`loss_fn(block, input_ids [B, L])` for `train.loop.train`: the block's layers in transfer mode on
    the teacher's hidden states at its input, each layer weighted 1 / num_layers (all converted layers)."""
    collector = PairCollector()
    weights = attn_ce_weight > 0

    def loss_fn(model, input_ids):
        hidden = inputs(input_ids)  # [B, L, D]
        collector.take()
        with transfer_mode(model, collector, weights=weights):
            model(hidden)
        pairs = collector.take()
        loss = transfer_mse(pairs, mse_factor, num_layers=num_layers)
        if weights:
            loss = loss + attn_ce_weight * attention_ce(pairs, num_layers=num_layers)
        return loss

    return loss_fn


@dataclass
class BlockwiseResult:
    """What `train_blocks` leaves to its caller: the joined student state (rank 0; None elsewhere), the
    stage's metrics, or the reason there was nothing to train."""

    student: Optional[dict[str, torch.Tensor]]
    metrics: dict
    skipped: Optional[str] = None


@dataclass
class _Blockwise:
    """Everything the per-block steps share."""

    cfg: object
    stage: str
    stage_dir: Path
    config: dict
    accept_changes: bool
    reader: SafetensorsReader
    dtype: torch.dtype
    converted: list[int]
    initial: dict
    train_tokens: torch.Tensor
    eval_tokens: torch.Tensor
    cache: HiddenCache
    plan: CachePlan
    device: torch.device
    log: Callable[[str], None]
    embed_name: str
    hidden_size: int
    rank: int


def train_blocks(cfg, stage_dir: Path, tokenizer, config: dict, *, stage: str, accept_changes: bool = False,
                 log: Callable[[str], None] = print) -> BlockwiseResult:
    """Trains the student block by block (`cfg.attention_transfer.block_size` layers each); see the
    module docstring. `config`: the full resolved run config (dict), checked on resume as by `train`."""
    stage_cfg, settings = cfg.attention_transfer, DistributedSettings.from_env()
    location = resolve_model_path(cfg.model.path)
    reader = SafetensorsReader.for_model(location)
    dtype = torch_dtype(cfg.model.dtype)
    lazy = LazyDecoder(reader, dtype)
    check_context(cfg, lazy)
    check_run_options(cfg.attention)
    converted = selected_layers(cfg.attention, lazy.num_layers)
    seed_everything(cfg.seed)
    initial, calibration = initial_mechanisms(cfg.attention, lazy.config.get_text_config(decoder=True), converted)
    if not any(t.numel() for state in initial.values() for t in state.values()):
        return BlockwiseResult(None, {}, skipped=f"{cfg.attention.mechanism} adds no trainable parameters")
    train_tokens, eval_tokens = build_datasets(cfg.data, tokenizer, cfg.seed)
    eval_tokens = in_stage_eval(eval_tokens, stage_cfg)
    blocks = layer_blocks(lazy.num_layers, stage_cfg.block_size)
    run = _Blockwise(cfg, stage, Path(stage_dir), config, accept_changes, reader, dtype, converted, initial,
                     train_tokens, eval_tokens, None, None, default_device(), log, lazy.embed_name,
                     lazy.config.get_text_config(decoder=True).hidden_size, settings.rank)
    _prepare_cache(run, lazy, blocks, settings, calibration_rows(calibration, train_tokens))
    trainable = [b for b, layers in enumerate(blocks) if set(layers) & set(converted)]
    for b in trainable:
        if b % settings.world_size == settings.rank:
            _train_block(run, lazy, b, blocks[b], len(blocks))
    barrier()  # every block is trained before rank 0 joins them
    if not settings.is_main:
        return BlockwiseResult(None, {})
    metrics = combine_metrics(run.stage_dir, trainable, stage)
    student = join_students(run.stage_dir, trainable)
    freed = sum(p.stat().st_size for p in (run.stage_dir / CACHE_DIR).rglob("*") if p.is_file())
    shutil.rmtree(run.stage_dir / CACHE_DIR, ignore_errors=True)
    if freed:
        log(f"{stage}: all blocks trained; removed the {freed / GB:.3g} GB hidden-state cache")
    return BlockwiseResult(student, {**metrics, "blocks": len(blocks), "block_size": stage_cfg.block_size})


def calibration_rows(tokens_wanted: int, train_tokens: torch.Tensor) -> int:
    """The first training rows calibration reads (whole sequences covering `tokens_wanted`)."""
    return min(len(train_tokens), math.ceil(tokens_wanted / train_tokens.shape[1]))


def _prepare_cache(run: _Blockwise, lazy: LazyDecoder, blocks: list[list[int]], settings, first_rows: int) -> None:
    stage_cfg = run.cfg.attention_transfer
    rows = wanted_rows(run.train_tokens, run.eval_tokens, stage_cfg, run.cfg.seed, run.cfg.data.shuffle, first_rows)
    dtype = cache_dtype(stage_cfg.cache_dtype, run.dtype)
    identity = {"model": str(run.reader.model_dir), "model_dtype": run.cfg.model.dtype, "autocast": stage_cfg.autocast}
    run.cache = HiddenCache(run.stage_dir / CACHE_DIR, rows, dtype, identity)
    run.plan = plan_cache([layers[0] for layers in blocks], len(rows), rows.shape[1], run.hidden_size, dtype,
                          int(stage_cfg.cache_gb * GB))
    if run.plan.starts:
        run.log(f"{run.stage}: {run.plan.summary()}")
    builder = LazyDecoder(run.reader, run.dtype)  # a plain teacher, apart from the student being trained
    run.cache.build(builder, blocks, run.plan, batch_size=stage_cfg.micro_batch_size, autocast=stage_cfg.autocast,
                    device=run.device, rank=settings.rank, world=settings.world_size, barrier=barrier)


def _block_inputs(run: _Blockwise, start: int) -> BlockInputs:
    """The teacher's hidden states at layer `start`: stored, or recomputed from the nearest stored
    boundary below (or the embeddings) through a teacher prefix holding the layers in between."""
    source = run.plan.nearest_stored(start) if start > 0 else None
    first = source if source is not None else 0
    prefix = None
    if first < start:
        prefix = LazyDecoder(run.reader, run.dtype)
        prefix.load(range(first, start))
        prefix.to(run.device)
    embeddings = run.reader.read(run.embed_name, run.dtype).to(run.device) if source is None else None
    return BlockInputs(run.cache, source, prefix, embeddings, run.dtype, run.hidden_size)


def _done(run: _Blockwise, folder: Path) -> bool:
    """A block finished under this config; a changed config is refused (naming the keys) unless
    accept_changes, which continues the block from its last checkpoint."""
    try:
        record = json.loads((folder / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not (folder / BLOCK_STUDENT).is_file():
        return False
    changed = check_same_config(record.get("config", {}), run.config, run.stage, folder / RESULT_FILE,
                                run.accept_changes)
    return not changed


def _train_block(run: _Blockwise, lazy: LazyDecoder, b: int, layers: list[int], num_blocks: int) -> None:
    folder = block_dir(run.stage_dir, b)
    if _done(run, folder):
        run.log(f"{run.stage}: block {b + 1}/{num_blocks} (layers {layers[0]}-{layers[-1]}) done, skipping")
        return
    run.log(f"{run.stage}: block {b + 1}/{num_blocks} (layers {layers[0]}-{layers[-1]})")
    stage_cfg = run.cfg.attention_transfer
    seed_everything(run.cfg.seed)  # every block starts from the same RNG state, whichever ran before it
    lazy.load(layers)
    wrap_block(lazy, layers, run.converted, run.cfg.attention, run.initial)
    linearize.freeze_for_transfer(lazy)
    lazy.to(run.device)
    inputs = _block_inputs(run, layers[0])
    folder.mkdir(parents=True, exist_ok=True)
    if latest_checkpoint(folder) is None:
        _calibrate(run, lazy, inputs, folder)
    loss_fn = block_objective(inputs, stage_cfg.mse_factor, stage_cfg.attn_ce_weight, len(run.converted))
    engine_cfg = dataclasses.replace(run.cfg.engine, name="single")  # a block is small: plain AdamW per rank
    result = train(lazy, loss_fn, run.train_tokens, run.eval_tokens, stage_cfg, stage_dir=folder, stage=run.stage,
                   seed=run.cfg.seed, engine_cfg=engine_cfg, config=run.config, shuffle=run.cfg.data.shuffle,
                   accept_changes=run.accept_changes)
    save_atomic(student_state(lazy), folder / BLOCK_STUDENT)
    write_json_atomic(folder / RESULT_FILE, {"layers": layers, "rank": run.rank, "step": result.step, "loss": result.loss,
                                             "eval_loss": result.eval_loss, "tokens": result.tokens,
                                             "config": run.config})
    lazy.release(layers)


def _calibrate(run: _Blockwise, lazy: LazyDecoder, inputs: BlockInputs, folder: Path) -> None:
    """attention.init=calibrated: the block's layers calibrate on the first training rows, as the
    all-at-once stage does on the whole model (`linearize.calibrating`)."""
    if not hasattr(linearize, "calibrating"):
        return
    wanted = linearize.calibration_tokens(lazy)
    if wanted == 0:
        return
    batch = run.train_tokens[:calibration_rows(wanted, run.train_tokens)].to(run.device)  # [rows, L]
    with torch.no_grad(), linearize.calibrating(lazy) as records:
        lazy(inputs(batch))
    write_json_atomic(folder / CALIBRATION_FILE, {"init": run.cfg.attention.init, "tokens": int(batch.numel()),
                                                   "layers": {str(i): records[i] for i in sorted(records)}})


def save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file written under a temporary name, then renamed: readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, tmp)
    os.replace(tmp, path)


def join_students(stage_dir: Path, blocks: list[int]) -> dict[str, torch.Tensor]:
    """The whole student: every trained block's parameters (full-model names) in one state dict."""
    joined: dict[str, torch.Tensor] = {}
    for b in blocks:
        joined.update(load_file(block_dir(stage_dir, b) / BLOCK_STUDENT))
    return joined


def combine_metrics(stage_dir: Path, blocks: list[int], stage: str) -> dict:
    """The stage's `metrics.jsonl` and plot from the blocks' logs: per step the summed loss (each layer
    weighs 1 / all converted layers, so this is the all-at-once loss), the global grad norm and the
    all-at-once throughput; returns the final metrics every training stage records."""
    logs = [{r["step"]: r for r in MetricsLog(block_dir(stage_dir, b) / METRICS_FILE).read()} for b in blocks]
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
    path = Path(stage_dir) / METRICS_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)
    plot_metrics(records, Path(stage_dir) / PLOT_FILE, stage)
    final = records[-1] if records else {}
    last_eval = next((r["eval_loss"] for r in reversed(records) if r.get("eval_loss") is not None), None)
    return {"step": final.get("step", 0), "loss": final.get("loss"), "eval_loss": last_eval,
            "tokens": final.get("tokens", 0), "plot": PLOT_FILE}
