"""Multi-process training through DeepSpeed ZeRO: the only module that imports `deepspeed` (lazily, so
importing linearize never initialises it).

Launch with `torchrun --nproc_per_node N -m linearize run CONFIG engine.name=deepspeed` or
`deepspeed --num_gpus N --module linearize run ...`. Every rank builds the same model (surgery and
freezing first), then `deepspeed.initialize` wraps a module whose forward *is* the stage's loss, so
ZeRO-3's forward hooks gather the partitioned weights for every submodule the loss touches, teacher
passes included (transfer-mode teacher attention, the adapter-disabled KL teacher).

Global batch per optimizer step = micro_batch_size × grad_accum × world_size: at micro-step j rank r
reads stream positions cursor + (j·world + r)·micro_batch_size …, which are exactly the sequences a
single process with grad_accum × world micro-steps reads, in the same order.

Checkpoints: `<stage_dir>/step_<N>/` holds DeepSpeed's own files under `engine/` (model + ZeRO
optimizer shards, with `universal_checkpoint_info` so `ds_to_universal` can convert them), one RNG
file per rank (safetensors), our scheduler/state/data/config JSON and a manifest with the sha256 of
every file. Rank 0 writes everything that is not per rank; the directory is renamed into place only
when complete.

Trust: linearize's own files hold no pickles, but DeepSpeed's `engine/` files are written with
torch.save and unpickled by DeepSpeed on resume, so loading them can run code. The manifest catches
corruption, not tampering: resume a DeepSpeed run directory only if you trust whoever wrote it."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import UserError
from .checkpoint import (ADVICE, CONFIG_FILE, DATA_FILE, DEEPSPEED_ENGINE, MANIFEST, SCHEDULER_FILE, STATE_FILE,
                         TMP_PREFIX, TrainerState, install_checkpoint, load_schedule, prune, read_trainer_state,
                         require_files, restore_rng, verify_checkpoint, write_fault, write_manifest,
                         write_rng, write_run_files)

ENGINE_TAG = "engine"
UNIVERSAL_TAG = "universal"  # `step_<N>/universal/`: the engine files converted for another world size
UNIVERSAL_CHECKPOINT_VERSION = 0.4
PRECISIONS = {"fp32": {}, "bf16": {"bf16": {"enabled": True}}, "fp16": {"fp16": {"enabled": True}}}
ZERO_STAGES = (1, 2, 3)
TRITON_CACHE_ENV = "TRITON_CACHE_DIR"
TRITON_CACHE_BASE_ENV = "LINEARIZE_TRITON_CACHE_BASE"
DEFAULT_TRITON_CACHE = Path.home() / ".triton" / "cache"
# Launcher variables a single `python` process lacks; without them DeepSpeed goes looking for MPI.
SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": "29511"}
# Part of every error about a DeepSpeed checkpoint that DeepSpeed itself reads.
TRUST_NOTE = ("DeepSpeed unpickles the engine/ files of its checkpoints, which can run code: resume only run "
              "directories you trust")
# DeepSpeed's own log lines (config dumps, timers) drown the progress bar; warnings still show.
DEEPSPEED_LOG_LEVEL = "WARNING"


@dataclass(frozen=True)
class DistributedSettings:
    """This process's place in the launch, read once from the launcher's environment variables (RANK,
    WORLD_SIZE, LOCAL_RANK; a plain `python` process is rank 0 of 1) and passed to what needs it.

    triton_cache_base: the folder under which each rank gets its own `rank<r>` kernel cache
    (LINEARIZE_TRITON_CACHE_BASE, else TRITON_CACHE_DIR, else Triton's default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    triton_cache_base: Path = DEFAULT_TRITON_CACHE

    @classmethod
    def from_env(cls, environ=None) -> "DistributedSettings":
        env = os.environ if environ is None else environ
        base = env.get(TRITON_CACHE_BASE_ENV) or env.get(TRITON_CACHE_ENV) or str(DEFAULT_TRITON_CACHE)
        return cls(rank=int(env.get("RANK", "0")), world_size=int(env.get("WORLD_SIZE", "1")),
                   local_rank=int(env.get("LOCAL_RANK", "0")), triton_cache_base=Path(base))

    @property
    def is_main(self) -> bool:
        """True on rank 0 (and in a plain single process): the only rank that writes shared files."""
        return self.rank == 0


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single process): the only rank that writes shared files."""
    return DistributedSettings.from_env().is_main


def set_triton_cache_per_rank(settings: Optional[DistributedSettings] = None) -> Path:
    """Points TRITON_CACHE_DIR at `<base>/rank<r>`, so ranks never race on one kernel cache file.

    An environment variable because torch.compile compiles Triton kernels in worker processes, which
    read it from the environment they inherit: an in-process setting would not reach them."""
    settings = settings or DistributedSettings.from_env()
    path = settings.triton_cache_base
    if path.name != f"rank{settings.rank}":  # already this rank's folder (a later stage): do not nest
        path = path / f"rank{settings.rank}"
    os.environ[TRITON_CACHE_ENV] = str(path)
    return path


def init(settings: Optional[DistributedSettings] = None) -> DistributedSettings:
    """Sets up this rank: per-rank Triton cache, then the process group (gloo on CPU, nccl on GPU).
    Returns the settings it used (read from the environment when not given)."""
    # DeepSpeed reads the launcher variables from the environment where no argument reaches: its engine
    # reads LOCAL_RANK, and init_distributed goes looking for MPI unless RANK, WORLD_SIZE, MASTER_ADDR,
    # MASTER_PORT and LOCAL_RANK are all set. A single process gets defaults; a launcher's are kept.
    for key, value in SINGLE_PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    settings = settings or DistributedSettings.from_env()
    set_triton_cache_per_rank(settings)
    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(DEEPSPEED_LOG_LEVEL)
    if torch.cuda.is_available():
        torch.cuda.set_device(settings.local_rank)
    deepspeed.init_distributed(verbose=False)
    return settings


def barrier() -> None:
    """Waits for every rank (no-op without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def deepspeed_config(engine_cfg, stage_cfg, world: int) -> dict:
    """The DeepSpeed config dict for a stage: batch geometry from the stage, ZeRO/precision/offload from
    `engine_cfg`. Unknown precision or ZeRO stage raise ValueError listing valid values."""
    if engine_cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown engine.precision {engine_cfg.precision!r}; valid: {', '.join(PRECISIONS)}")
    if engine_cfg.zero_stage not in ZERO_STAGES:
        raise ValueError(f"engine.zero_stage must be one of {ZERO_STAGES}, got {engine_cfg.zero_stage}")
    if engine_cfg.offload_params and engine_cfg.zero_stage != 3:
        raise UserError("engine.offload_params=true needs engine.zero_stage=3")
    zero = {"stage": engine_cfg.zero_stage}
    if engine_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if engine_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": stage_cfg.micro_batch_size,
        "gradient_accumulation_steps": stage_cfg.grad_accum,
        "train_batch_size": stage_cfg.micro_batch_size * stage_cfg.grad_accum * world,
        "gradient_clipping": max(stage_cfg.grad_clip, 0.0),
        "zero_optimization": zero,
        # A client torch AdamW is passed in; DeepSpeed must not JIT-build its fused Adam.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
        **PRECISIONS[engine_cfg.precision],
    }


class LossModule(torch.nn.Module):
    """`forward(input_ids) = loss_fn(model, input_ids)`: DeepSpeed wraps this, so the stage's whole loss
    (student and teacher passes) runs inside the engine's forward and its ZeRO-3 hooks."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, input_ids)


@dataclass
class DeepSpeedEngine:
    """The loop's engine seam over a `deepspeed.DeepSpeedEngine` (see linearize.train.engine.Engine)."""

    ds: object
    model: torch.nn.Module
    device: torch.device
    zero_stage: int
    rank: int
    world_size: int
    loss_scaling: bool = False  # engine.precision=fp16: DeepSpeed skips overflowing steps itself
    scaler: None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def optimizer(self):
        return self.ds.optimizer

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.ds(input_ids)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is already divided by grad_accum (as in the single engine); DeepSpeed's step after each
        micro-batch only counts it, and reduces + updates at the accumulation boundary."""
        self.ds.backward(loss, scale_wrt_gas=False)
        self.ds.step()

    def step(self, grad_clip: float):
        """The update already ran in the last micro-batch's backward; returns its global grad norm (None
        when DeepSpeed did not compute one)."""
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def gather(self, values: list[float]) -> list[float]:
        """Per-micro-batch values of every rank, in global stream order (micro j of rank r at j·world + r)."""
        # On the engine's device: nccl all-gathers only device tensors (gloo takes CPU ones).
        local = torch.tensor(values, dtype=torch.float64, device=self.device)  # [grad_accum]
        stacked = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(stacked, local)
        return torch.stack(stacked, dim=1).flatten().tolist()  # [grad_accum · world]

    def barrier(self) -> None:
        barrier()

    def save(self, stage_dir: Path, schedule_state: dict, state: TrainerState, config: dict, keep_last: int,
             data: dict) -> Path:
        return save_engine_checkpoint(self, Path(stage_dir), schedule_state, state, config, keep_last, data)

    def load(self, path: Path, schedule) -> TrainerState:
        return load_engine_checkpoint(self, Path(path), schedule)

    def finish(self) -> None:
        """Leaves full, unpartitioned weights in `model` (ZeRO-3 keeps only shards) and frees the engine,
        so the stage can save the student and adapter as after a single-process run."""
        full = gather_full_weights(self.ds) if self.zero_stage == 3 else None
        self.ds.destroy()
        if full is not None:
            restore_full_weights(self.model, full)


def gather_full_weights(ds) -> dict[str, torch.Tensor]:
    """Every parameter of the wrapped model, gathered from the ZeRO-3 shards (collective)."""
    import deepspeed

    full = {}
    for name, param in ds.module.model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            full[name] = param.data.detach().clone()
    return full


def restore_full_weights(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Puts the gathered tensors back as plain parameters (call after the engine's destroy, which removes
    ZeRO-3's module hooks)."""
    for name, param in model.named_parameters():
        param.data = full[name]


def build_deepspeed_engine(engine_cfg, model: torch.nn.Module, stage_cfg, loss_fn: Callable,
                           settings: Optional[DistributedSettings] = None) -> DeepSpeedEngine:
    """Wraps `model` (surgery and freezing already done) in a DeepSpeed engine; only the trainable
    parameters reach the client torch AdamW."""
    settings = init(settings)
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: the model has no parameter with requires_grad")
    device = torch.device(deepspeed.get_accelerator().device_name(settings.local_rank))
    optimizer = torch.optim.AdamW(params, lr=stage_cfg.lr, weight_decay=stage_cfg.weight_decay)
    config = deepspeed_config(engine_cfg, stage_cfg, settings.world_size)
    ds, _, _, _ = deepspeed.initialize(model=LossModule(model, loss_fn), optimizer=optimizer, config=config)
    return DeepSpeedEngine(ds=ds, model=model, device=device, zero_stage=engine_cfg.zero_stage, rank=settings.rank,
                           world_size=settings.world_size, loss_scaling=engine_cfg.precision == "fp16")


def _rng_file(which: int) -> str:
    return f"rng_rank{which}.safetensors"


def _all_ok(engine: DeepSpeedEngine, ok: bool) -> bool:
    """Collective: True when `ok` holds on every rank, so all ranks stop together after a fault on one
    (a rank that raised alone would leave the others waiting in the next barrier)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=engine.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0.0


def _write_step(engine: DeepSpeedEngine, stage_dir: Path, tmp: Path, final: Path, write: Callable) -> None:
    """Runs this rank's part of a checkpoint write; if any rank hit an OSError (disk full, quota,
    read-only), rank 0 removes the temp dir and every rank raises the same kind of UserError."""
    fault = None
    try:
        write()
    except OSError as err:
        fault = err
    if _all_ok(engine, fault is None):
        return
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if fault is None:
        fault = OSError(f"rank {engine.rank}: another rank failed to write its part")
    raise write_fault(final, fault, stage_dir)


def _start_tmp(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def save_engine_checkpoint(engine: DeepSpeedEngine, stage_dir: Path, schedule_state: dict, state: TrainerState,
                           config: dict, keep_last: int, data: dict) -> Path:
    """Collective: writes `step_<N>` (DeepSpeed shards + our files + manifest), renamed into place by rank
    0 once every rank has written; then prunes to `keep_last`. A write fault on any rank removes the
    temp dir and raises UserError on every rank."""
    final = stage_dir / f"step_{state.step}"
    tmp = stage_dir / f"{TMP_PREFIX}{state.step}-deepspeed"
    _write_step(engine, stage_dir, tmp, final, lambda: _start_tmp(tmp) if engine.is_main else None)
    client_state = {"universal_checkpoint_info": {"universal_checkpoint_version": UNIVERSAL_CHECKPOINT_VERSION},
                    "linearize": asdict(state)}

    def write_rank_files():
        engine.ds.save_checkpoint(str(tmp), tag=ENGINE_TAG, client_state=client_state, save_latest=False,
                                  exclude_frozen_parameters=True)
        write_rng(tmp / _rng_file(engine.rank))

    _write_step(engine, stage_dir, tmp, final, write_rank_files)

    def finish():
        if engine.is_main:
            write_run_files(tmp, schedule_state, state, config, data)
            write_manifest(tmp, {"step": state.step, "engine": DEEPSPEED_ENGINE, "world_size": engine.world_size})
            install_checkpoint(tmp, final)
            prune(stage_dir, keep_last)

    _write_step(engine, stage_dir, tmp, final, finish)
    return final


def _universal_tag(engine: DeepSpeedEngine, path: Path) -> str:
    """Converts `path/engine` into DeepSpeed's world-size-independent universal format (rank 0, once;
    later resumes reuse it) and returns its tag. Collective."""
    target = path / UNIVERSAL_TAG
    if engine.is_main and not target.is_dir():
        tmp = path / f".{UNIVERSAL_TAG}-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", str(path / ENGINE_TAG), "--output_folder", str(tmp)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode
            raise UserError(f"checkpoint {path}: converting it to a universal checkpoint failed: {reason}; {TRUST_NOTE}")
        os.replace(tmp, target)
    barrier()
    return UNIVERSAL_TAG


def _load_engine_state(engine: DeepSpeedEngine, path: Path, saved_world: int) -> None:
    """Same world size: DeepSpeed's own shards. Another world size: through the universal format,
    which DeepSpeed reads when its (runtime-read) `load_universal_checkpoint` setting is on."""
    tag = ENGINE_TAG
    if saved_world != engine.world_size:
        tag = _universal_tag(engine, path)
        engine.ds._config.load_universal_checkpoint = True
    try:
        loaded, _ = engine.ds.load_checkpoint(str(path), tag=tag, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
    except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as err:
        loaded, reason = None, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    else:
        reason = "it found no checkpoint there"
    engine.ds._config.load_universal_checkpoint = False
    if loaded is None:
        raise UserError(f"checkpoint {path}: DeepSpeed could not load {path / tag} ({reason}); {TRUST_NOTE}")


def load_engine_checkpoint(engine: DeepSpeedEngine, path: Path, schedule) -> TrainerState:
    """Collective: restores weights and ZeRO optimizer shards, schedule, this rank's RNG and the trainer
    state. A checkpoint from another number of ranks is converted to a universal checkpoint first; the
    data cursor is global, so the stream continues where it stopped (the global batch then follows
    the new world size). DeepSpeed unpickles its own `engine/` files: see the module docstring."""
    manifest = verify_checkpoint(path)
    if manifest.get("engine") != DEEPSPEED_ENGINE:
        raise UserError(f"checkpoint {path} was written by the single-process engine; resume it with "
                        "engine.name=single, or start this stage afresh (--force)")
    saved_world = manifest.get("world_size")
    if not isinstance(saved_world, int) or isinstance(saved_world, bool) or saved_world < 1:
        raise UserError(f"checkpoint {path} is malformed: {MANIFEST} has no positive world_size; {ADVICE}")
    # A rank the saving run did not have continues from rank 0's RNG stream.
    rng_name = _rng_file(engine.rank if engine.rank < saved_world else 0)
    require_files(path, manifest, (SCHEDULER_FILE, STATE_FILE, DATA_FILE, CONFIG_FILE, rng_name))
    _load_engine_state(engine, path, saved_world)
    load_schedule(path, schedule)
    restore_rng(path, rng_name)
    return read_trainer_state(path)
