"""Typed configuration schemas. The yaml loader lives in `stages/config_loader.py`: the library never
reads yaml or argv."""
from .dicts import changed_keys, config_to_dict, flatten
from .schema import (
    AttentionConfig,
    DataConfig,
    EngineConfig,
    EvaluateConfig,
    ExportConfig,
    LoraRecoveryConfig,
    ModelConfig,
    RunConfig,
    TrainStageConfig,
    TransferConfig,
    stage_sections,
)

__all__ = [
    "AttentionConfig", "DataConfig", "EngineConfig", "EvaluateConfig", "ExportConfig",
    "LoraRecoveryConfig", "ModelConfig", "RunConfig", "TrainStageConfig", "TransferConfig", "changed_keys",
    "config_to_dict", "flatten", "stage_sections",
]
