"""Calibration of fresh students (`attention.init=calibrated`): one forward of the teacher over the first
training rows sets each converted layer's new parameters from its teacher attention statistics
(the statistics themselves: `linearize.attention.calibrate`). Written once here for the three callers:
a stage's fresh student, each block of a block-wise stage, and the softmax-layer probe."""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .modes import switch_mode, wrapped_attentions


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[dict]:
    """Within the block, a forward of `model` (or of any module holding converted layers) calibrates every
    converted layer that asks for it from the teacher attention of that call's inputs, and returns the
    teacher's outputs, so each layer sees exact teacher inputs. Yields a dict that fills with
    {layer_idx: record of what was set}."""
    records: dict = {}

    def collect(item) -> None:
        layer_idx, record = item
        records[layer_idx] = record

    with switch_mode(model, "calibrate", collect):
        yield records


def calibration_tokens(model: nn.Module) -> int:
    """The most calibration tokens any converted layer under `model` asks for; 0 = nothing to calibrate."""
    return max((a.mechanism.calibration_tokens() for a in wrapped_attentions(model)), default=0)


def calibration_rows(tokens_wanted: int, tokens: torch.Tensor) -> int:
    """How many of the first rows of `tokens` `[N, L]` calibration reads: whole sequences covering
    `tokens_wanted` (all rows if there are fewer)."""
    return min(len(tokens), math.ceil(tokens_wanted / tokens.shape[1]))


def calibrate(model: nn.Module, tokens: torch.Tensor, init: str,
              forward: Optional[Callable[[torch.Tensor], object]] = None) -> Optional[dict]:
    """Calibrates every converted layer of `model` that asks for it on the first rows of `tokens` `[N, L]`;
    `forward(batch [rows, L])` runs the model (default: `model(input_ids=batch)`; a block-wise stage maps
    the rows to their cached hidden states first). Deterministic: the same rows give the same values.
    Returns the record a run keeps, {"init", "tokens", "layers": {idx: what was set}}, or None when no
    layer asks for calibration."""
    wanted = calibration_tokens(model)
    if wanted == 0:
        return None
    device = next(model.parameters()).device
    batch = tokens[:calibration_rows(wanted, tokens)].to(device)  # [rows, L]
    run = forward or (lambda rows: model(input_ids=rows))
    with torch.no_grad(), calibrating(model) as records:
        run(batch)
    return {"init": init, "tokens": int(batch.numel()), "layers": {str(i): records[i] for i in sorted(records)}}
