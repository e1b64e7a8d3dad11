"""Models: loading teachers (a Hugging Face directory, a .gguf file, or a registered name such as the
embedded `smollm2-135m-instruct`) and the exported student format.

Attributes load lazily. Importing the package registers the exported `linearize_<base>` model types
with the transformers Auto classes (`hf.register_auto_classes`).
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
}

__all__ = list(_EXPORTS)

# transformers is already imported by `linearize` itself (the attention cache), so registering costs nothing.
from . import hf as _hf  # noqa: E402

_hf.register_auto_classes()


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
