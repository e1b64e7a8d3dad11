"""linearize: convert softmax-attention decoder LLMs into linear and hybrid attention students."""
from .attention import TransferPair, available_mechanisms
from .config import AttentionConfig
from .errors import UserError
from .feature_maps import available_feature_maps
from .surgery import (
    freeze_for_transfer,
    linearize_model,
    student_parameters,
    teacher_mode,
    transfer_mode,
    unlinearize_model,
)

__all__ = [
    "AttentionConfig", "TransferPair", "UserError", "available_feature_maps", "available_mechanisms",
    "freeze_for_transfer", "linearize_model", "student_parameters", "teacher_mode", "transfer_mode",
    "unlinearize_model",
]
