"""The exported student: a Hugging Face directory (config.json, model.safetensors, tokenizer,
generation config) whose config.json carries a `linearize` section — the attention config and each
converted layer's mechanism — so `load_export` rebuilds it from the base architecture alone, without
the training run's files. An unmerged LoRA adapter, if any, sits in `adapter/` and is merged on load.

config.json names the model type `linearize_<base>` and maps the Auto classes (`auto_map`) to the
bundled `modeling_linearize.py` (see `bundle.py`), so plain transformers loads the directory with
`trust_remote_code=True` even where linearize is not installed; after `import linearize.models` the Auto
classes load it without remote code (`hf.register_auto_classes`)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_model, save_model

import linearize
from ..config.schema import AttentionConfig
from ..errors import UserError
from . import bundle, hf

WEIGHTS_FILE = "model.safetensors"
RUN_CONFIG_FILE = "linearize_run.json"
ADAPTER_DIR = "adapter"
SECTION = "linearize"
# Layers that stay softmax use the fastest exact implementation, as the teacher loader does.
ATTN_IMPLEMENTATION = "sdpa"
# safetensors writes owner-only files; an export is meant to be shared like any model directory.
SHARED_FILE_MODE = 0o644
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_export_dir(path: Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and SECTION in json.loads(config.read_text())


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def _layers(section: dict) -> dict[int, str]:
    return {int(idx): mechanism for idx, mechanism in section["layers"].items()}


def save_export(model: torch.nn.Module, tokenizer, out_dir: Path, *, dtype: Optional[str] = None,
                run_config: Optional[dict] = None, adapter_dir: Optional[Path] = None) -> Path:
    """Writes a converted (LoRA-merged, unwrapped) model as a self-describing directory, atomically.

    dtype: cast the weights (float32 | bfloat16 | float16; None keeps them). run_config: the resolved
    run config, stored so `linearize eval` on the export knows its data settings. adapter_dir: an
    unmerged LoRA adapter to ship beside the weights."""
    if not getattr(model.config, SECTION, None):
        raise ValueError("the model has no config.linearize section: was it converted with linearize_model?")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if dtype is not None:
        model.to(_dtype(dtype))
        model.config.dtype = dtype
    # save_model drops duplicate storage (tied embeddings) and load_model re-ties it.
    save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    os.chmod(tmp / WEIGHTS_FILE, SHARED_FILE_MODE)
    model.config.save_pretrained(tmp)
    _make_self_loading(tmp / "config.json")
    bundle.write_bundle(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if run_config is not None:
        (tmp / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2))
    if adapter_dir is not None:
        shutil.copytree(adapter_dir, tmp / ADAPTER_DIR)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _make_self_loading(config_file: Path) -> None:
    """Rewrites the saved config as the `linearize_<base>` model type, with `auto_map` pointing the
    Auto classes at the bundled modeling file."""
    config = json.loads(config_file.read_text())
    base = config["model_type"].removeprefix(hf.MODEL_TYPE_PREFIX)  # re-exporting a loaded export
    config_class, model_class = hf.classes_for(base)
    module = bundle.MODELING_MODULE
    config.update(
        model_type=config_class.model_type,
        architectures=[model_class.__name__],
        auto_map={"AutoConfig": f"{module}.{config_class.__name__}",
                  "AutoModelForCausalLM": f"{module}.{model_class.__name__}"},
    )
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_export(path: Path):
    """(model in eval mode, tokenizer) from an export directory: base architecture from config.json,
    `linearize_model` re-applied from the recorded section, then the saved weights (strict)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    if not is_export_dir(path):
        raise UserError(f"{path} is not a linearize export (no config.json with a `{SECTION}` section)")
    hf.register_auto_classes()
    config = AutoConfig.from_pretrained(path)
    section = getattr(config, SECTION)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
    if not isinstance(model, tuple(model_class for _, model_class in hf.CLASSES.values())):
        # An export written before the linearize_<base> model types: a base config with the section.
        linearize.linearize_model(model, AttentionConfig(**section["attention"]))
    rebuilt = _layers(getattr(model.config, SECTION))
    if rebuilt != _layers(section):
        raise UserError(f"{path}: re-applying the recorded attention config gives layers {rebuilt}, "
                        f"but the export records {_layers(section)}")
    _load_weights(model, path)
    if (path / ADAPTER_DIR).is_dir():
        from peft import PeftModel

        from ..train.student import merge_lora

        model = merge_lora(PeftModel.from_pretrained(model, path / ADAPTER_DIR))
    model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    weights = path / WEIGHTS_FILE
    first = next(iter(model.parameters()))
    dtype = getattr(model.config, "dtype", None)
    if isinstance(dtype, str) and dtype in DTYPES and DTYPES[dtype] != first.dtype:
        model.to(DTYPES[dtype])
    missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise UserError(f"{weights} does not fit the rebuilt model: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
