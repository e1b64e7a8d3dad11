"""Evaluation of a (converted or exported) causal LM: long context (synthetic passkey retrieval over
context lengths × needle depths, perplexity by position bucket; markdown tables and a heatmap) and
behaviour (agreement with the teacher on fixed instructions, short and after long documents; badge-list
recall; the recall loss a layer selector scores layers by)."""
from .agreement import teacher_agreement
from .instructions import EVAL_INSTRUCTIONS
from .long_context import run_long_context
from .passkey import passkey_prompt, passkey_retrieval
from .position_ppl import perplexity_by_position
from .recall import badge_recall, recall_loss, recall_scores
from .report import long_context_markdown, plot_passkey_heatmap

__all__ = [
    "EVAL_INSTRUCTIONS", "badge_recall", "long_context_markdown", "passkey_prompt", "passkey_retrieval",
    "perplexity_by_position", "plot_passkey_heatmap", "recall_loss", "recall_scores", "run_long_context",
    "teacher_agreement",
]
