"""LoRA adapters through peft, the only module of linearize that imports it (lazily: importing
linearize, or loading an export without an adapter, never needs peft).

- `wrap`: a converted model → a PeftModel with fresh LoRA layers (only the adapters train).
- `attach`: a saved adapter folder → a PeftModel around the model.
- `unwrap`: the Hugging Face model inside a PeftModel (LoRA layers stay injected).
- `teacher_view`: inside the block the same weights compute the teacher (adapter off, softmax attention).
- `merge`: LoRA folded into the weights, the plain model back.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .errors import UserError
from .surgery import student_parameters, teacher_mode

# The two files `save_pretrained` writes into an adapter folder, and `attach` reads back.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_wrapped(model: torch.nn.Module) -> bool:
    """True for a PeftModel (duck-typed, so the check itself never imports peft)."""
    return hasattr(model, "disable_adapter")


@contextlib.contextmanager
def _quiet_peft():
    """peft asks transformers >= 5 for `is_gradient_checkpointing`, which warns that it is deprecated on
    every LoRA run; the warning is about peft's code, not the user's, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def wrap(model: torch.nn.Module, *, rank: int, alpha: float, dropout: float, targets: Sequence[str],
         train_student: bool = False):
    """A PeftModel with LoRA (rank, alpha, dropout) on the modules named `targets`. Only the adapters
    train, and with `train_student` also the student parameters (feature maps, gates, ...). No targets:
    the model itself, with only its student parameters trainable (no adapter)."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    if not targets:
        _train_student(model)
        return model
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      task_type="CAUSAL_LM")
    with _quiet_peft():
        peft_model = get_peft_model(model, lora)
    if train_student:
        _train_student(unwrap(peft_model))
    return peft_model


def _train_student(model: torch.nn.Module) -> None:
    for params in student_parameters(model).values():
        for _, param in params:
            param.requires_grad_(True)


def attach(model: torch.nn.Module, adapter: Path):
    """A PeftModel around `model` with the adapter saved in folder `adapter`; UserError naming the
    folder when it is damaged or was trained on another model."""
    from peft import PeftModel

    try:
        with _quiet_peft():
            return PeftModel.from_pretrained(model, Path(adapter))
    except Exception as exc:  # peft/safetensors raise their own types for a damaged or foreign adapter
        raise UserError(f"cannot load the LoRA adapter {adapter}: {' '.join(str(exc).split())}") from None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a PeftModel (LoRA layers stay injected), else the model."""
    return model.get_base_model() if is_wrapped(model) else model


@contextlib.contextmanager
def teacher_view(model: torch.nn.Module):
    """Inside: `model` computes the teacher (adapter off, softmax attention in every layer), so no
    second copy of the weights is ever loaded."""
    with contextlib.ExitStack() as stack:
        if is_wrapped(model):
            stack.enter_context(model.disable_adapter())
        stack.enter_context(teacher_mode(unwrap(model)))
        yield model


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Merges LoRA into the weights and returns the plain model (a model that is not wrapped passes
    through).

    peft's own `merge_and_unload` treats every module with a `base_layer` attribute as one of its
    layers, which would also unwrap the linearized attentions; this touches only peft's layers."""
    if not is_wrapped(model):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    lora_layers = [(name, module) for name, module in base.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in lora_layers:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, module.get_base_layer())
    if hasattr(base, "peft_config"):
        del base.peft_config
    return base
