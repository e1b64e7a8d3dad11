"""The long-context evaluation `linearize eval` runs when `evaluate.long_context` asks for it."""
from __future__ import annotations

from ..files import write_json, write_text

from pathlib import Path
from typing import Optional

import torch

from .passkey import passkey_retrieval
from .position_ppl import perplexity_by_position
from .report import HEATMAP_FILE, long_context_markdown, plot_passkey_heatmap

MARKDOWN_FILE = "long_context.md"
JSON_FILE = "long_context.json"


def enabled(lc_cfg) -> bool:
    return bool(lc_cfg.passkey_lengths) or lc_cfg.position_seq_len > 0


def run_long_context(lc_cfg, model, tokenizer, position_tokens: Optional[torch.Tensor], out_dir: Optional[Path],
                     seed: int = 0) -> dict:
    """Passkey retrieval (when `passkey_lengths` is set) and perplexity by position (when
    `position_tokens` `[M, L]` is given); with `out_dir`, also writes the results as JSON, the markdown
    tables and the heatmap (`linearize eval` prints its results; the evaluate stage also puts them in eval.json)."""
    result: dict = {}
    if lc_cfg.passkey_lengths:
        result["passkey"] = passkey_retrieval(model, tokenizer, list(lc_cfg.passkey_lengths),
                                              list(lc_cfg.passkey_depths), lc_cfg.passkey_trials, seed)
    if position_tokens is not None:
        result["position_ppl"] = perplexity_by_position(model, position_tokens, lc_cfg.position_buckets)
    if out_dir is not None and result:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / MARKDOWN_FILE, long_context_markdown(result))
        if "passkey" in result:
            result["passkey_heatmap"] = str(plot_passkey_heatmap(result["passkey"], out_dir / HEATMAP_FILE))
        write_json(out_dir / JSON_FILE, result)
    return result
