"""Training machinery shared by the stages: the loop, exact-resume checkpoints, metrics and plots,
the engine seam, and run-state helpers (config snapshots and their comparison)."""
from .checkpoint import (TrainerState, checkpoint_dirs, latest_checkpoint, load_checkpoint, save_checkpoint,
                         verify_checkpoint)
from .engine import AUTOCAST_DTYPES, Engine, autocast_context, build_engine, default_device
from .loop import METRICS_FILE, PLOT_FILE, TrainResult, evaluate_loss, train
from .metrics import MetricsLog, plot_metrics
from .sampler import sample_indices
from .schedule import SCHEDULES, build_schedule
from .state import changed_keys, check_same_config, config_to_dict, seed_everything, stage_view

__all__ = [
    "AUTOCAST_DTYPES", "Engine", "METRICS_FILE", "MetricsLog", "PLOT_FILE", "SCHEDULES",
    "TrainResult", "TrainerState", "autocast_context", "build_engine", "build_schedule", "changed_keys",
    "check_same_config", "checkpoint_dirs", "config_to_dict", "default_device",
    "evaluate_loss", "latest_checkpoint", "load_checkpoint", "plot_metrics",
    "sample_indices", "save_checkpoint", "seed_everything", "stage_view", "train", "verify_checkpoint",
]

