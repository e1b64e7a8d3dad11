"""linearize: convert softmax-attention decoder LLMs into linear and hybrid attention students."""
from .attention import (
    LinearizedAttention,
    StudentCache,
    TransferPair,
    available_mechanisms,
    cache_nbytes,
    mechanism_config_keys,
)
from .config import AttentionConfig
from .errors import UserError
from .feature_maps import available_feature_maps, build_feature_map
from .surgery import (
    calibrating,
    calibration_tokens,
    freeze_for_transfer,
    linearize_model,
    set_recompute,
    student_parameters,
    teacher_mode,
    transfer_mode,
    unlinearize_model,
)

__all__ = [
    "AttentionConfig", "LinearizedAttention", "StudentCache", "TransferPair", "UserError",
    "available_feature_maps", "calibrating", "calibration_tokens", "available_mechanisms", "build_feature_map", "cache_nbytes", "freeze_for_transfer",
    "linearize_model", "mechanism_config_keys", "set_recompute", "student_parameters", "teacher_mode",
    "transfer_mode", "unlinearize_model",
]
