"""The exported student: a Hugging Face directory (config.json, model.safetensors, tokenizer,
generation config) whose config.json carries a `linearize` section — the attention config and each
converted layer's mechanism — so `load_export` rebuilds it from the base architecture alone, without
the training run's files. An unmerged LoRA adapter, if any, sits in `adapter/` and is merged on load.

config.json names the model type `linearize_<base>` and maps the Auto classes (`auto_map`) to the
bundled `modeling_linearize.py` (see `bundle.py`), so plain transformers loads the directory with
`trust_remote_code=True` even where linearize is not installed; after
`linearize.models.register_auto_classes()` (which `load_export` calls) the Auto classes load it without
remote code.

What an export promises (docs/guarantees.md):
- the section records the sha256 of every bundled code file and the transformers version it was
  written with; `load_export` refuses code files that differ, are missing or are not recorded, and
  warns once when the installed transformers is outside the range linearize declares;
- no file holds an absolute path of the machine that wrote it;
- writing is all or nothing: a failed export leaves no temporary folder and an existing export intact.

The format is `export_format.py`, writing `export_writer.py`, loading `export_loader.py`; this module
keeps the names other modules import.
"""
from __future__ import annotations

from .export_format import (ADAPTER_DIR, BUNDLE_KEY, CONFIG_FILE, LOADED_FROM_KEYS, RUN_CONFIG_FILE,  # noqa: F401
                            SECTION, VERSION_KEY, WEIGHTS_FILE, is_export_dir, without_local_paths)
from .export_loader import (ATTN_IMPLEMENTATION, check_transformers_version, load_export,  # noqa: F401
                            tested_transformers, verify_bundle)
from .export_writer import save_export  # noqa: F401
