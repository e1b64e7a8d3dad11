"""The floating-point dtypes a config may name (`model.dtype`, `export.dtype`): the one table every
loader, exporter and config check reads."""
from __future__ import annotations

import torch

from .errors import UserError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named `name`; UserError listing the valid names otherwise."""
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]
