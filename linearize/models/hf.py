"""Exported students as Hugging Face model classes.

For each supported base architecture (`llama`, `mistral`, `qwen2`, `qwen3`) there is a config class
with `model_type = "linearize_<base>"` (a subclass of the base config; its `linearize` field records
the attention config and each layer's mechanism) and a model class (a subclass of the base
`*ForCausalLM`) whose constructor builds the base architecture and then re-applies the recorded
conversion, so `from_pretrained` loads the saved weights into the converted modules.

This file is also the export's `modeling_linearize.py`: `bundle.write_bundle` copies it with its
linearize imports rewritten to flat sibling files, so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works where linearize is not installed. Keep its linearize imports relative.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..errors import UserError
from ..surgery import ARCHITECTURES, linearize_model

SECTION = "linearize"
MODEL_TYPE_PREFIX = "linearize_"


def model_type_for(base_model_type: str) -> str:
    return MODEL_TYPE_PREFIX + base_model_type


def _class_stem(base_model_type: str) -> str:
    return "Linearize" + base_model_type.capitalize()


@contextlib.contextmanager
def _seen_as_base(config) -> Iterator[None]:
    """Within the block the config reports its base `model_type`, which is what the surgery's
    architecture table is keyed by; the class attribute (and so the saved config) is untouched."""
    config.model_type = config.base_model_type
    try:
        yield
    finally:
        del config.model_type


def apply_recorded_conversion(model: torch.nn.Module) -> torch.nn.Module:
    """Re-applies `model.config.linearize` (attention config + layer mechanisms) to a freshly built base
    model; raises UserError if the rebuilt layers differ from the recorded ones."""
    section = getattr(model.config, SECTION, None)
    if not section:
        raise UserError(f"the config of this {type(model).__name__} has no `{SECTION}` section")
    recorded = {int(i): m for i, m in section["layers"].items()}
    with _seen_as_base(model.config):
        linearize_model(model, dict(section["attention"]))
    rebuilt = {int(i): m for i, m in model.config.linearize["layers"].items()}
    if rebuilt != recorded:
        raise UserError(f"re-applying the recorded attention config gives layers {rebuilt}, "
                        f"but the config records {recorded}")
    return model


def leading_pads(attention_mask) -> torch.Tensor | None:
    """Per row, the number of pad positions before its first token (`attention_mask` `[B, T]`, 1 =
    token), or None when no row is left-padded."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    tokens = attention_mask.bool()
    pads = (~tokens).long().cumprod(-1).sum(-1)  # [B]: zeros before the first token
    return pads if bool((pads > 0).any()) else None


def _pad_token(model, kwargs: dict) -> int:
    config = kwargs.get("generation_config") or model.generation_config
    pad = kwargs.get("pad_token_id", config.pad_token_id)
    if pad is None:
        eos = config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
    if pad is None:
        raise UserError("left-padded generation needs pad_token_id (or an eos_token_id) to pad the outputs")
    return int(pad)


# generate arguments that bound the total length (prompt + new tokens), as opposed to max_new_tokens.
LENGTH_LIMITS = ("max_length", "min_length")


class RowStoppingCriteria(StoppingCriteria):
    """Presents a batch-level stopping criterion (e.g. lm-eval's, which tracks every row of the batch it
    was built for) with the batch it expects while one row is generated alone: the row's ids, with its
    left padding restored, in every slot; the row's own slot decides."""

    def __init__(self, criteria: StoppingCriteriaList, row: int, batch: int, skip: int, pad: int):
        super().__init__()
        self.criteria, self.row, self.batch, self.skip, self.pad = criteria, row, batch, skip, pad

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        n = input_ids.shape[0]  # this row's sequences (beams)
        ids = torch.cat([input_ids.new_full((n, self.skip), self.pad), input_ids], dim=1)  # [n, T + new]
        scores = scores.repeat(self.batch, 1) if scores is not None else None  # generate may pass None
        done = self.criteria(ids.repeat(self.batch, 1), scores, **kwargs)  # [batch·n] or one bool
        if isinstance(done, torch.Tensor) and done.dim() > 0:
            return done[self.row * n:(self.row + 1) * n]
        return torch.full((n,), bool(done), dtype=torch.bool, device=input_ids.device)


def generate_rows(model, generate, input_ids: torch.Tensor, attention_mask: torch.Tensor, pads: torch.Tensor,
                  **kwargs) -> torch.Tensor:
    """Left-padded batch `[B, T]` → `[B·n, T + new]`, as batched `generate` lays it out (prompts keep their
    left padding, rows that stop early are filled with the pad token), generating each row on its own
    unpadded tokens: the student states then never see the padding, so every row is exact."""
    if kwargs.get("return_dict_in_generate"):
        raise UserError("return_dict_in_generate is not supported for left-padded batches yet; "
                        "generate one sequence at a time")
    pad = _pad_token(model, kwargs)
    criteria = kwargs.pop("stopping_criteria", None)
    rows = []
    for row, skip in enumerate(pads.tolist()):
        if criteria:  # a fresh copy per row: criteria may keep per-row state
            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [RowStoppingCriteria(copy.deepcopy(criteria), row, len(pads), skip, pad)])
        # Total-length limits count the padding in a batch; a row alone is `skip` tokens shorter.
        lengths = {key: kwargs[key] - skip for key in LENGTH_LIMITS if kwargs.get(key) is not None}
        out = generate(input_ids=input_ids[row:row + 1, skip:], attention_mask=attention_mask[row:row + 1, skip:],
                       **{**kwargs, **lengths})  # [n, T − skip + new_row]
        rows.append(torch.cat([out.new_full((out.shape[0], skip), pad), out], dim=1))  # [n, T + new_row]
    width = max(r.shape[1] for r in rows)
    return torch.cat([torch.cat([r, r.new_full((r.shape[0], width - r.shape[1]), pad)], dim=1) for r in rows])


def _make_classes(base_model_type: str) -> tuple[type, type]:
    base_config = CONFIG_MAPPING[base_model_type]
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    stem = _class_stem(base_model_type)
    config_class = type(f"{stem}Config", (base_config,), {
        "model_type": model_type_for(base_model_type),
        "base_model_type": base_model_type,
        "__module__": __name__,
        "__doc__": f"A {base_config.__name__} whose `{SECTION}` field records the attention conversion.",
    })

    def __init__(self, config, *args, **kwargs):
        base_model.__init__(self, config, *args, **kwargs)
        apply_recorded_conversion(self)

    def generate(self, input_ids=None, *args, attention_mask=None, **kwargs):
        """`generate`; a left-padded batch is generated row by row (see `generate_rows`)."""
        pads = leading_pads(attention_mask)
        if pads is None or input_ids is None:
            return base_model.generate(self, input_ids, *args, attention_mask=attention_mask, **kwargs)
        return generate_rows(self, lambda **kw: base_model.generate(self, *args, **kw), input_ids, attention_mask,
                             pads, **kwargs)

    model_class = type(f"{stem}ForCausalLM", (base_model,), {
        "config_class": config_class,
        "__init__": __init__,
        "generate": generate,
        "__module__": __name__,
        "__doc__": f"{base_model.__name__} with the attention conversion recorded in its config re-applied.",
    })
    return config_class, model_class


CLASSES: dict[str, tuple[type, type]] = {base: _make_classes(base) for base in ARCHITECTURES}
# Module-level names, so `auto_map` entries such as `modeling_linearize.LinearizeLlamaForCausalLM` resolve.
for _config_class, _model_class in CLASSES.values():
    globals()[_config_class.__name__] = _config_class
    globals()[_model_class.__name__] = _model_class


def classes_for(base_model_type: str) -> tuple[type, type]:
    """(config class, model class) for a base architecture; ValueError lists the supported ones."""
    if base_model_type not in CLASSES:
        raise ValueError(f"no exported model class for architecture {base_model_type!r}; "
                         f"supported: {', '.join(CLASSES)}")
    return CLASSES[base_model_type]


def register_auto_classes() -> None:
    """Makes `AutoConfig` / `AutoModelForCausalLM` resolve the `linearize_<base>` model types."""
    for config_class, model_class in CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
