"""Typed configuration schemas, the rules beside their fields (`rules.py`) and the check of a typed config
(`validate.py`). The yaml loader lives in `stages/config_loader.py`: the library never reads yaml or argv."""
from .dicts import changed_keys, config_to_dict, flatten
from .schema import (
    AttentionConfig,
    DataConfig,
    EngineConfig,
    EvaluateConfig,
    ExportConfig,
    LoraRecoveryConfig,
    MixEntry,
    ModelConfig,
    RecallDataConfig,
    RunConfig,
    TeacherSamplesConfig,
    TrainStageConfig,
    TransferConfig,
    stage_sections,
)
from .validate import validate

__all__ = [
    "AttentionConfig", "DataConfig", "EngineConfig", "EvaluateConfig", "ExportConfig",
    "LoraRecoveryConfig", "MixEntry", "ModelConfig", "RecallDataConfig", "RunConfig", "TeacherSamplesConfig",
    "TrainStageConfig", "TransferConfig", "changed_keys", "config_to_dict", "flatten", "stage_sections", "validate",
]
