"""Long-context results as markdown tables and a passkey heatmap PNG."""
from __future__ import annotations

from pathlib import Path

HEATMAP_FILE = "passkey.png"


def _passkey_table(passkey: dict) -> list[str]:
    depths = passkey["depths"]
    lines = ["| context \\ depth | " + " | ".join(f"{d:g}" for d in depths) + " |", "|---" * (len(depths) + 1) + "|"]
    for length, row in zip(passkey["lengths"], passkey["accuracy"]):
        lines.append(f"| {length} | " + " | ".join(f"{a:.2f}" for a in row) + " |")
    return lines


def _position_table(position: dict) -> list[str]:
    lines = ["| positions | perplexity |", "|---|---|"]
    lines += [f"| {b['start']}–{b['end'] - 1} | {b['ppl']:.4g} |" for b in position["buckets"]]
    return lines


def long_context_markdown(result: dict) -> str:
    """The `long_context` part of eval.json as markdown (empty string when nothing ran)."""
    lines = []
    if "passkey" in result:
        p = result["passkey"]
        lines += ["### Passkey retrieval", "", f"Exact-match accuracy over {p['trials']} keys per cell "
                  f"(mean {p['mean_accuracy']:.2f}).", "", *_passkey_table(p), ""]
    if "position_ppl" in result:
        pos = result["position_ppl"]
        lines += ["### Perplexity by position", "", f"{pos['sequences']} sequences of {pos['seq_len']} tokens.", "",
                  *_position_table(pos), ""]
    return "\n".join(lines)


def plot_passkey_heatmap(passkey: dict, path: Path) -> Path:
    """Accuracy heatmap: context length (rows) × needle depth (columns)."""
    # A figure of its own with the Agg canvas: no pyplot, so matplotlib's process-wide backend and
    # figure list stay as the caller left them.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lengths, depths = passkey["lengths"], passkey["depths"]
    fig = Figure(figsize=(1.2 + 0.8 * len(depths), 1.2 + 0.5 * len(lengths)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(passkey["accuracy"], vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    ax.set_title("passkey retrieval accuracy")
    for i, row in enumerate(passkey["accuracy"]):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
