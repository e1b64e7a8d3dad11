"""The student as the library knows it: a teacher converted by `linearize_model`, and its student
parameters (feature maps, gates, mixing, conv) saved to and loaded from a safetensors file. Which file
a run reads belongs to the runners (`stages/rundir.py`); LoRA adapters to `linearize.adapters`."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import linearize
from ..errors import UserError, one_line
from ..files import save_safetensors


def student_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every student parameter (feature maps, gates, mixing, conv), by name."""
    groups = linearize.student_parameters(model)
    return {name: p.detach().cpu().contiguous() for params in groups.values() for name, p in params}


def save_student(model: torch.nn.Module, path: Path) -> Path:
    return save_safetensors(student_state(model), Path(path))


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; UserError naming it when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise UserError(f"{path} is damaged ({one_line(exc)})") from None


def load_student(model: torch.nn.Module, path: Path) -> None:
    """Copies saved student parameters into `model`; the names and shapes must match exactly (same
    mechanism, same layers, same sizes), else UserError naming the first parameter that does not fit."""
    saved = _read_safetensors(path)
    params = {name: p for params in linearize.student_parameters(model).values() for name, p in params}
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    if missing or unexpected:
        raise UserError(f"{path} does not fit this student (attention config changed?): "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, param in params.items():
        if saved[name].shape != param.shape:
            raise UserError(f"{path} does not fit this student: {name} is {tuple(saved[name].shape)} there "
                            f"but {tuple(param.shape)} in the model (attention config changed?)")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


def check_context(cfg, model) -> None:
    """Refuses data.seq_len beyond the positions the teacher was trained on, unless
    data.allow_beyond_context: RoPE models extrapolate poorly, so such a run trains on garbage."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and cfg.data.seq_len > limit and not cfg.data.allow_beyond_context:
        raise UserError(f"data.seq_len={cfg.data.seq_len} is beyond the model's trained context "
                        f"(max_position_embeddings={limit}); lower it, or set data.allow_beyond_context=true")


def load_converted(cfg):
    """(teacher with cfg.attention's layers linearized, tokenizer); student parameters freshly initialized."""
    from ..models.teacher import load_teacher

    model, tokenizer = load_teacher(cfg.model)
    check_context(cfg, model)
    linearize.linearize_model(model, cfg.attention)
    return model, tokenizer
