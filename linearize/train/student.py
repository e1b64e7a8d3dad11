"""Building the student a stage works on, shared by the stage runners: teacher → linearize → the
student parameters of earlier stages → the LoRA adapter; plus the teacher view of that same model
(adapter disabled, teacher attention) so no second copy of the weights is ever loaded."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

import linearize
from ..config.schema import AttentionConfig
from ..errors import UserError

STUDENT_FILE = "student.safetensors"
ADAPTER_DIR = "adapter"
# Later stages supersede earlier ones: LoRA may have trained the student parameters further.
STUDENT_SOURCES = ("lora_recovery", "attention_transfer")


def student_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every student parameter (feature maps, gates, mixing, conv), by name."""
    groups = linearize.student_parameters(model)
    return {name: p.detach().cpu().contiguous() for params in groups.values() for name, p in params}


def save_student(model: torch.nn.Module, path: Path) -> Path:
    save_file(student_state(model), Path(path))
    return Path(path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; UserError naming it when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own error types for truncated or garbled files
        raise UserError(f"{path} is damaged ({' '.join(str(exc).split())})") from None


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


def _finished(run_dir: Path, stage: str) -> bool:
    """True if `stage` finished in `run_dir`; False if it never started. UserError if it started and
    did not finish: its outputs must not be replaced by silent defaults."""
    from .state import read_done

    stage_dir = Path(run_dir) / stage
    if read_done(stage_dir) is not None:
        return True
    if stage_dir.is_dir() and any(stage_dir.iterdir()):
        raise UserError(f"{stage} in {run_dir} has not finished (no DONE record in {stage_dir}): run it to the "
                        "end first (`linearize run` resumes it)")
    return False


def find_student_file(run_dir: Path, sources=STUDENT_SOURCES) -> Optional[Path]:
    """The newest finished stage's saved student parameters, or None (no stage trained them). A finished
    stage without its file, or a stage that started and did not finish, is an error, never a fallback."""
    for stage in sources:
        if _finished(run_dir, stage):
            path = Path(run_dir) / stage / STUDENT_FILE
            if not path.is_file():
                raise UserError(f"{stage} finished but its output {path} is missing; re-run the stage "
                                f"(`--force`) to recreate it")
            return path
    return None


def attention_config(cfg) -> AttentionConfig:
    """cfg.attention as the AttentionConfig dataclass `linearize_model` takes (the loader gives a
    read-only OmegaConf node)."""
    from .state import config_to_dict

    return AttentionConfig(**config_to_dict(cfg)["attention"])


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
    linearize.linearize_model(model, attention_config(cfg))
    return model, tokenizer


def build_student(cfg, run_dir: Path, sources=STUDENT_SOURCES):
    """(linearized model, tokenizer, student file used or None) from cfg.model and cfg.attention."""
    model, tokenizer = load_converted(cfg)
    source = find_student_file(run_dir, sources)
    if source is not None:
        load_student(model, source)
    return model, tokenizer, source


def adapter_dir(run_dir: Path) -> Optional[Path]:
    """The LoRA stage's adapter folder if that stage finished, None if it never ran; UserError if it
    finished without a loadable adapter (or started and did not finish)."""
    if not _finished(run_dir, "lora_recovery"):
        return None
    adapter = Path(run_dir) / "lora_recovery" / ADAPTER_DIR
    config = adapter / "adapter_config.json"
    weights = adapter / "adapter_model.safetensors"
    for needed in (config, weights):
        if not needed.is_file():
            raise UserError(f"lora_recovery finished but its output {needed} is missing; re-run the stage "
                            "(`--force`) to recreate it")
    return adapter


def attach_adapter(model: torch.nn.Module, run_dir: Path):
    """The model with the LoRA stage's adapter (a PeftModel), or the model itself if LoRA did not run."""
    adapter = adapter_dir(run_dir)
    if adapter is None:
        return model
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter)
    except Exception as exc:  # peft/safetensors errors for a damaged adapter or one of another model
        raise UserError(f"cannot load the LoRA adapter {adapter}: {' '.join(str(exc).split())}") from None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a PeftModel (LoRA layers stay injected), else the model."""
    return model.get_base_model() if hasattr(model, "disable_adapter") else model


@contextlib.contextmanager
def teacher_view(model: torch.nn.Module):
    """Inside: `model` computes the teacher (adapter off, softmax attention in every layer)."""
    with contextlib.ExitStack() as stack:
        if hasattr(model, "disable_adapter"):
            stack.enter_context(model.disable_adapter())
        stack.enter_context(linearize.teacher_mode(unwrap(model)))
        yield model


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits `[B, T, V]` predicting input_ids `[B, T]` shifted by one (fp32)."""
    shifted = logits[:, :-1].float().flatten(0, 1)  # [B·(T−1), V]
    return torch.nn.functional.cross_entropy(shifted, input_ids[:, 1:].flatten())


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Merges LoRA into the weights and returns the plain model (a non-peft model passes through).

    peft's own `merge_and_unload` treats every module with a `base_layer` attribute as one of its
    layers, which would also unwrap the linearized attentions; this touches only peft's layers."""
    if not hasattr(model, "disable_adapter"):
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
