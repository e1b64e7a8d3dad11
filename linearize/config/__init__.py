"""Typed configuration schemas. The yaml loader lives in `stages/config_loader.py`: the library never
reads yaml or argv."""
from .schema import (
    AttentionConfig,
    DataConfig,
    EngineConfig,
    EvaluateConfig,
    ExportConfig,
    LoraRecoveryConfig,
    ModelConfig,
    RunConfig,
    TransferConfig,
)

__all__ = [
    "AttentionConfig", "DataConfig", "EngineConfig", "EvaluateConfig", "ExportConfig",
    "LoraRecoveryConfig", "ModelConfig", "RunConfig", "TransferConfig",
]
