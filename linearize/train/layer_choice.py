"""Choosing which layers keep softmax attention (`attention.softmax_layers: auto`).

A selector scores every candidate layer of a model converted in all of them; the choice is the `count`
layers with the highest scores (the ones that convert worst). Selectors form a registry (`SELECTORS`):

- `transfer_probe`: a short attention-transfer run of every converted layer at once (each layer trains
  on exact teacher inputs in transfer mode, so one joint probe scores all layers), then each layer's
  relative transfer error (MSE / mean teacher output²) on held-out tokens. Costs `steps` transfer
  steps plus one held-out forward.
- `uniform`: evenly spaced layers, no data (score 1 on the chosen layers, 0 elsewhere).
- `layer_kl`: the same probe, then each layer's held-out KL(teacher || the model with only that layer
  converted). Costs the probe plus (candidates + 1) held-out forwards of the whole model.
- `recall`: the same probe, then each layer's rise in the loss of held-out in-context recall answers
  (`data.recall.recall_examples`, never the passkey's format) when only that layer is converted: the layers
  the model needs in order to copy from its context (../shared/METHODS.md §12). Optionally blended with
  `layer_kl`'s score (`recall_weight` < 1; each score scaled by its largest value first). Costs the probe
  plus (candidates + 1) forwards of the recall examples (and layer_kl's when blended).

The library never reads or writes the run directory: `stages/common.py` records the choice and
reuses it on resume."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..losses import PairCollector, distill_kl, transfer_mse, transfer_objective
from ..config import EngineConfig
from ..evals.recall import recall_scores
from ..surgery import calibrate, freeze_for_transfer, students_only_in, transfer_mode, wrapped_attentions
from .engine import build_engine

AUTO = "auto"  # the attention.softmax_layers value that asks a run to choose
# The record's keys for what was asked, and the AttentionConfig keys (read by the run, whatever the
# mechanism) they come from: a recorded choice serves only the same request.
REQUEST_KEYS = {"selector": "softmax_layer_selector", "count": "softmax_layer_count", "steps": "selection_steps"}
# A layer whose teacher output is all zeros has nothing to match: its relative error stays finite.
ENERGY_FLOOR = 1e-30


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
    recall: tuple = ()  # held-out recall examples (input_ids [T], answer_positions [A]) for the recall selector
    recall_weight: float = 1.0  # recall selector: 1 = recall only, 0 = layer_kl only, between: a blend

    def optimizer_settings(self):
        """What `train.engine.build_engine` reads of a stage config: AdamW at `lr`, no decay, fp32."""
        return _ProbeOptimizer(lr=self.lr)


@dataclass(frozen=True)
class _ProbeOptimizer:
    lr: float
    weight_decay: float = 0.0
    autocast: str = "none"


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


def held_out_relative_error(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 1) -> dict[int, float]:
    """{layer: MSE(student, teacher) / mean(teacher²) of its attention output} over `tokens` `[M, L]`, every
    converted layer on exact teacher inputs (one forward per batch). Relative, because the raw MSE follows
    the size of each layer's outputs, which grows with depth (docs/attention.md)."""
    collector = PairCollector()
    error: dict[int, float] = {}
    energy: dict[int, float] = {}
    with torch.no_grad(), transfer_mode(model, collector, weights=False):
        for start in tqdm(range(0, len(tokens), batch_size), desc="softmax layers: scoring", leave=False):
            batch = _device_rows(tokens, range(start, min(start + batch_size, len(tokens))), model)
            model.get_decoder()(input_ids=batch, use_cache=False)
            for pair in collector.take():
                teacher = pair.teacher.float()
                # sums of per-batch means times rows: every row weighs the same
                error[pair.layer_idx] = error.get(pair.layer_idx, 0.0) + transfer_mse([pair]).item() * len(batch)
                energy[pair.layer_idx] = energy.get(pair.layer_idx, 0.0) + teacher.pow(2).mean().item() * len(batch)
    return {layer: error[layer] / max(energy[layer], ENERGY_FLOOR) for layer in sorted(error)}


def _train_probe(model: torch.nn.Module, probe: Probe) -> None:
    """The calibrated init (if any, on the same first rows as a fresh student of the run), then
    `probe.steps` steps of the stage-1 objective on every converted layer's student parameters at once,
    through the stages' own engine (plain AdamW at a constant rate, no weight decay; a mechanism without
    student parameters trains nothing)."""
    calibrate(model, probe.train, init="probe")
    params = freeze_for_transfer(model)
    if not params:
        return
    loss_fn = transfer_objective(probe.mse_factor)
    engine = build_engine(EngineConfig(name="single"), model, probe.optimizer_settings(), loss_fn)
    for step in tqdm(range(probe.steps), desc="softmax layers: probe", leave=False):
        first = step * probe.micro_batch_size
        engine.backward(engine.loss(_device_rows(probe.train, range(first, first + probe.micro_batch_size), model)))
        engine.step(probe.grad_clip)


def transfer_probe(model: torch.nn.Module, count: int, probe: Probe) -> dict[int, float]:
    """Each layer's held-out relative transfer error after the probe: high = its teacher attention is hard
    to follow."""
    _train_probe(model, probe)
    return held_out_relative_error(model, probe.held_out, probe.micro_batch_size)


def _logits(model: torch.nn.Module, tokens: torch.Tensor, students: Iterable[int]) -> list[torch.Tensor]:
    """Logits `[1, L, V]` of each row of `tokens` `[M, L]` with only the converted layers in `students` converted."""
    with torch.no_grad(), students_only_in(model, students):
        return [model(input_ids=_device_rows(tokens, range(row, row + 1), model), use_cache=False).logits
                for row in range(len(tokens))]


def _kl_scores(model: torch.nn.Module, probe: Probe) -> dict[int, float]:
    """Each converted layer's held-out KL(teacher || model with only that layer converted), per token. Keeps
    the teacher's logits of every held-out row in memory and runs one held-out pass per candidate."""
    model.eval()
    teacher = _logits(model, probe.held_out, ())
    scores = {}
    for layer in tqdm(candidate_layers(model), desc="softmax layers: layer_kl", leave=False):
        converted = _logits(model, probe.held_out, (layer,))
        scores[layer] = sum(distill_kl(s, t).item() for s, t in zip(converted, teacher)) / len(teacher)
    return scores


def layer_kl(model: torch.nn.Module, count: int, probe: Probe) -> dict[int, float]:
    """After the same probe, how far converting each layer alone moves the model's output (`_kl_scores`):
    costlier than transfer_probe."""
    _train_probe(model, probe)
    return _kl_scores(model, probe)


def _scaled(scores: dict[int, float]) -> dict[int, float]:
    """Scores divided by the largest one (so two kinds of score can be blended); all-zero stays zero."""
    top = max(scores.values(), default=0.0)
    return {layer: value / top if top > 0 else 0.0 for layer, value in scores.items()}


def recall(model: torch.nn.Module, count: int, probe: Probe) -> dict[int, float]:
    """After the same probe, each layer's rise in held-out recall loss when it alone is converted (high = the
    model copies from its context through that layer), blended with layer_kl by `probe.recall_weight`."""
    if not probe.recall:
        raise UserError("the recall selector needs held-out recall examples (the run builds them from the "
                        "data.recall settings)")
    _train_probe(model, probe)
    model.eval()
    rise = recall_scores(model, list(probe.recall), candidate_layers(model), batch_size=probe.micro_batch_size)
    if probe.recall_weight >= 1.0:
        return rise
    kl, rise = _scaled(_kl_scores(model, probe)), _scaled(rise)
    return {layer: probe.recall_weight * rise[layer] + (1.0 - probe.recall_weight) * kl[layer] for layer in rise}


@dataclass(frozen=True)
class SelectorSpec:
    score: Selector
    probes: bool  # trains and scores on the probe's tokens (False: reads no data)
    reads_recall: bool = False  # scores on held-out recall examples (`Probe.recall`)


SELECTORS: dict[str, SelectorSpec] = {
    "transfer_probe": SelectorSpec(transfer_probe, probes=True),
    "uniform": SelectorSpec(uniform, probes=False),
    "layer_kl": SelectorSpec(layer_kl, probes=True),
    "recall": SelectorSpec(recall, probes=True, reads_recall=True),
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
