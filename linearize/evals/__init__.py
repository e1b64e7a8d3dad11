"""Long-context evaluation of a (converted or exported) causal LM: synthetic passkey retrieval over
context lengths × needle depths, and perplexity by position bucket; markdown tables and a heatmap."""
from .long_context import run_long_context
from .passkey import passkey_prompt, passkey_retrieval
from .position_ppl import perplexity_by_position
from .report import long_context_markdown, plot_passkey_heatmap

__all__ = [
    "long_context_markdown", "passkey_prompt", "passkey_retrieval", "perplexity_by_position",
    "plot_passkey_heatmap", "run_long_context",
]
