"""Choosing which layers keep softmax attention (`attention.softmax_layers: auto`).

A selector scores every candidate layer of a model converted in all of them; the choice is the `count`
layers with the highest scores (the ones that convert worst). Selectors form a registry (`SELECTORS`):

- `transfer_probe`: a short attention-transfer run of every converted layer at once (each layer trains
  on exact teacher inputs in transfer mode, so one joint probe scores all layers), then each layer's
  transfer MSE on held-out tokens. Costs `steps` transfer steps plus one held-out forward.
- `uniform`: evenly spaced layers, no data (score 1 on the chosen layers, 0 elsewhere).

The library never reads or writes the run directory: `stages/common.py` records the choice and
reuses it on resume."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError
from ..losses import PairCollector, transfer_mse, transfer_objective
from ..surgery import calibrating, calibration_tokens, freeze_for_transfer, transfer_mode, wrapped_attentions

AUTO = "auto"  # the attention.softmax_layers value that asks a run to choose
# The record's keys for what was asked, and the AttentionConfig keys (read by the run, whatever the
# mechanism) they come from: a recorded choice serves only the same request.
REQUEST_KEYS = {"selector": "softmax_layer_selector", "count": "softmax_layer_count", "steps": "selection_steps"}


@dataclass(frozen=True)
class Probe:
    """What a selector may read: training token rows `[N, L]` (calibration and probe steps), held-out
    rows `[M, L]` (scoring), and the probe's optimizer settings (the transfer stage's)."""

    train: torch.Tensor
    held_out: torch.Tensor
    steps: int
    lr: float
    micro_batch_size: int = 1
    grad_clip: float = 1.0
    mse_factor: float = 1.0


Selector = Callable[[torch.nn.Module, int, Probe], dict[int, float]]


def softmax_layer_count(count: float, candidates: int) -> int:
    """`attention.softmax_layer_count` as a number of layers: N >= 1 is N, 0 < N < 1 a fraction of the
    candidates (rounded, at least 1). UserError unless at least one candidate stays converted."""
    layers = int(count) if count >= 1 else max(1, round(count * candidates))
    if not 0 < layers < candidates:
        raise UserError(f"attention.softmax_layer_count={count:g} asks for {layers} softmax layers of "
                        f"{candidates} candidates: at least one layer must stay converted")
    return layers


def candidate_layers(model: torch.nn.Module) -> list[int]:
    """The converted layers of `model`, in order."""
    return sorted(attn.layer_idx for attn in wrapped_attentions(model))


def choose(scores: dict[int, float], count: int) -> list[int]:
    """The `count` layers with the highest scores, sorted; equal scores prefer the lower layer."""
    ranked = sorted(scores, key=lambda layer: (-scores[layer], layer))
    return sorted(ranked[:count])


def uniform(model: torch.nn.Module, count: int, probe: Probe) -> dict[int, float]:
    """Evenly spaced candidates: the middle of each of `count` equal runs of candidate layers."""
    candidates = candidate_layers(model)
    stride = len(candidates) / count
    chosen = {candidates[math.floor((i + 0.5) * stride)] for i in range(count)}
    return {layer: float(layer in chosen) for layer in candidates}


def _device_rows(tokens: torch.Tensor, rows: range, model: torch.nn.Module) -> torch.Tensor:
    index = torch.tensor([r % len(tokens) for r in rows])
    return tokens[index].to(next(model.parameters()).device)  # [len(rows), L]


def _calibrate(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    """`attention.init=calibrated`: the same first-rows calibration a fresh student of the run gets."""
    wanted = calibration_tokens(model)
    if wanted:
        batch = _device_rows(tokens, range(min(len(tokens), math.ceil(wanted / tokens.shape[1]))), model)
        with torch.no_grad(), calibrating(model):
            model(input_ids=batch)


def held_out_transfer_mse(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 1) -> dict[int, float]:
    """{layer: MSE(student, teacher) of its attention output} over `tokens` `[M, L]`, every converted
    layer on exact teacher inputs (one forward per batch)."""
    collector = PairCollector()
    totals: dict[int, float] = {}
    with torch.no_grad(), transfer_mode(model, collector, weights=False):
        for start in range(0, len(tokens), batch_size):
            batch = _device_rows(tokens, range(start, min(start + batch_size, len(tokens))), model)
            model.get_decoder()(input_ids=batch, use_cache=False)
            for pair in collector.take():
                # rows weigh equally: the sum of per-batch means times rows, divided by all rows below
                totals[pair.layer_idx] = totals.get(pair.layer_idx, 0.0) + transfer_mse([pair]).item() * len(batch)
    return {layer: total / len(tokens) for layer, total in sorted(totals.items())}


def transfer_probe(model: torch.nn.Module, count: int, probe: Probe) -> dict[int, float]:
    """Trains every converted layer's student parameters for `probe.steps` transfer steps, then scores
    each layer by its held-out transfer MSE: high = hard to convert. A mechanism without student
    parameters is scored as it is."""
    _calibrate(model, probe.train)
    params = freeze_for_transfer(model)
    loss_fn = transfer_objective(probe.mse_factor)
    optimizer = torch.optim.AdamW(params, lr=probe.lr, weight_decay=0.0) if params else None
    for step in range(probe.steps if params else 0):
        first = step * probe.micro_batch_size
        loss = loss_fn(model, _device_rows(probe.train, range(first, first + probe.micro_batch_size), model))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if probe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, probe.grad_clip)
        optimizer.step()
    return held_out_transfer_mse(model, probe.held_out, probe.micro_batch_size)


@dataclass(frozen=True)
class SelectorSpec:
    score: Selector
    probes: bool  # trains and scores on the probe's tokens (False: reads no data)


SELECTORS: dict[str, SelectorSpec] = {
    "transfer_probe": SelectorSpec(transfer_probe, probes=True),
    "uniform": SelectorSpec(uniform, probes=False),
}


def select_softmax_layers(model: torch.nn.Module, selector: str, count: float, probe: Probe) -> dict:
    """Scores the converted layers of `model` (converted in every candidate) with selector `selector`
    and chooses the `count` (see `softmax_layer_count`) to keep softmax. May train `model`'s student
    parameters: pass a throwaway model. Returns the record a run stores: selector, request, scores,
    choice, and the tokens read."""
    if selector not in SELECTORS:
        raise UserError(f"unknown softmax layer selector {selector!r}; valid: {', '.join(SELECTORS)}")
    spec = SELECTORS[selector]
    candidates = candidate_layers(model)
    layers = softmax_layer_count(count, len(candidates))
    scores = spec.score(model, layers, probe)
    probe_rows = probe.steps * probe.micro_batch_size if spec.probes else 0
    return {"selector": selector, "count": count, "steps": probe.steps, "layers": layers,
            "candidates": candidates, "scores": {str(k): v for k, v in scores.items()},
            "choice": choose(scores, layers),
            "tokens": {"probe": probe_rows * probe.train.shape[1],
                       "held_out": int(probe.held_out.numel()) if spec.probes else 0}}
