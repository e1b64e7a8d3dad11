"""Serving families a student can be trained in the exact form of (`attention.native_family`), and exported
to as a plain checkpoint that engines load without remote code (`linearize export --format NAME`)."""
from __future__ import annotations

# name -> what it is; the one declaration of the names (config checks and the export read it).
FAMILIES: dict[str, str] = {
    "qwen3_5": "transformers' qwen3_5_text (Qwen3_5ForCausalLM): Gated DeltaNet + gated softmax attention layers",
}
