"""Models: loading teachers (a Hugging Face directory, a .gguf file, or a registered name such as the
embedded `smollm2-135m-instruct`) and the exported student format.

Attributes load lazily; importing the package changes nothing outside it. `register_auto_classes()` makes
the transformers Auto classes resolve the exported `linearize_<base>` model types (`load_export` calls
it; call it yourself before `AutoModelForCausalLM.from_pretrained(export)` without remote code).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_teacher": "teacher",
    "load_tokenizer": "teacher",
    "load_model_tokenizer": "teacher",
    "REGISTERED_MODELS": "teacher",
    "save_export": "exported",
    "load_export": "exported",
    "register_auto_classes": "hf",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
