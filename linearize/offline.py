"""Whether the environment switches the Hugging Face hub off: the one list of the variables and of what each
kind of download (models, datasets) listens to."""
from __future__ import annotations

import os

# HF_HUB_OFFLINE switches every hub download off; each library also has its own switch.
MODEL_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
DATASET_SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
TRUE_VALUES = ("1", "true", "yes", "on")


def _any_set(names: tuple[str, ...]) -> bool:
    return any(os.environ.get(name, "").lower() in TRUE_VALUES for name in names)


def models_offline() -> bool:
    """Hub model downloads are switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return _any_set(MODEL_SWITCHES)


def datasets_offline() -> bool:
    """Hub dataset downloads are switched off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return _any_set(DATASET_SWITCHES)
