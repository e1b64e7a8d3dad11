"""What the converted layers of a model compute, switched for the length of a `with` block: the student
(default), the teacher's own softmax attention, transfer (both, with the pair handed to a collector), or
calibration (`calibration.py`)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

from torch import nn

from ..attention import LinearizedAttention


def wrapped_attentions(model: nn.Module) -> Iterator[LinearizedAttention]:
    for module in model.modules():
        if isinstance(module, LinearizedAttention):
            yield module


@contextlib.contextmanager
def switch_mode(model: nn.Module, mode: str, collector: Callable | None = None, weights: bool = False):
    attns = list(wrapped_attentions(model))
    previous = [(a.mode, a.collector, a.collect_weights) for a in attns]
    for a in attns:
        a.mode, a.collector, a.collect_weights = mode, collector, weights
    try:
        yield model
    finally:
        for a, (m, c, w) in zip(attns, previous):
            a.mode, a.collector, a.collect_weights = m, c, w


def transfer_mode(model: nn.Module, collector: Callable, weights: bool | None = None):
    """Within the block each converted layer hands `TransferPair`s to `collector` and returns the
    teacher's output. `weights=True` adds the student and teacher attention weights `[B, H, T, T]` to
    each pair (mechanisms with a parallel weight form: linear, window_linear). `weights=None` reads the
    collector's `want_weights` attribute once, here (what `PairCollector(want_weights=...)` sets)."""
    if weights is None:
        weights = bool(getattr(collector, "want_weights", False))
    return switch_mode(model, "transfer", collector, weights)


def teacher_mode(model: nn.Module):
    """Within the block every converted layer runs its original softmax attention."""
    return switch_mode(model, "teacher")


@contextlib.contextmanager
def students_only_in(model: nn.Module, layers: Iterable[int]) -> Iterator[nn.Module]:
    """Within the block only the converted layers in `layers` run their student; every other converted
    layer runs its original softmax attention (the effect of converting just those layers)."""
    keep = set(layers)
    with teacher_mode(model):
        for a in wrapped_attentions(model):
            if a.layer_idx in keep:
                a.mode = "student"  # leaving teacher_mode restores every layer's own mode
        yield model


