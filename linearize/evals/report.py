"""Long-context results as markdown tables and a passkey heatmap PNG; the hybrids' branch shares as a
markdown table and a stacked bar PNG; the softmax layer choice's per-layer scores as a bar PNG."""
from __future__ import annotations

from pathlib import Path

from ..files import save_figure

HEATMAP_FILE = "passkey.png"
BRANCH_PLOT_FILE = "branch_shares.png"


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
        # Results written before digit accuracy existed lack it; their tables stay as they were.
        digits = (f"; digits in place: mean {p['mean_digit_accuracy']:.2f}, about 0.1 by guessing"
                  if "mean_digit_accuracy" in p else "")
        lines += ["### Passkey retrieval", "", f"Exact-match accuracy over {p['trials']} keys per cell "
                  f"(mean {p['mean_accuracy']:.2f}{digits}).", "", *_passkey_table(p), ""]
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
    return save_figure(fig, Path(path))


def _branch_names(layers: dict) -> list[str]:
    """The branch names of a `branch_shares["layers"]` record, window first, in first-seen order."""
    names = ["window"]
    for shares in layers.values():
        names += [name for name in shares if name not in names and name != "mechanism"]
    return names


def branch_shares_markdown(shares: dict) -> str:
    """The `branch_shares` part of eval.json as a markdown table: one row per converted layer."""
    layers = shares["layers"]
    names = _branch_names(layers)
    lines = ["| layer | mechanism | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for layer, row in layers.items():
        cells = " | ".join(f"{row[n]:.3f}" if n in row else "–" for n in names)
        lines.append(f"| {layer} | {row['mechanism']} | {cells} |")
    return "\n".join(lines)


def plot_branch_shares(shares: dict, path: Path) -> Path:
    """Stacked bars per converted layer: the window share at the bottom, the other branch above (to 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = shares["layers"]
    names = _branch_names(layers)
    fig = Figure(figsize=(1.5 + 0.35 * len(layers), 3.2))
    FigureCanvasAgg(fig)  # a canvas of its own, as plot_passkey_heatmap
    ax = fig.subplots()
    positions = range(len(layers))
    bottom = [0.0] * len(layers)
    for name in names:
        heights = [row.get(name, 0.0) for row in layers.values()]
        ax.bar(positions, heights, bottom=bottom, label=name)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(list(positions), list(layers))
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the attention output")
    ax.set_title("branch shares per layer")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_layer_scores(record: dict, path: Path) -> Path:
    """One bar per candidate layer (its selector score, high = hard to convert); the layers chosen to keep
    softmax are drawn in another colour. `record` is a `linearize.train.layer_choice` record."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = [int(layer) for layer in record["scores"]]
    chosen = set(record["choice"])
    fig = Figure(figsize=(max(4.0, 1.5 + 0.3 * len(layers)), 3.2))  # wide enough for the title at few layers
    FigureCanvasAgg(fig)  # a canvas of its own, as plot_passkey_heatmap
    ax = fig.subplots()
    colours = ["tab:red" if layer in chosen else "tab:blue" for layer in layers]
    ax.bar(range(len(layers)), [record["scores"][str(layer)] for layer in layers], color=colours)
    ax.set_xticks(list(range(len(layers))), [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{record['selector']} score")
    ax.set_title(f"softmax layers (red): {record['layers']} of {len(layers)}")
    fig.tight_layout()
    return save_figure(fig, Path(path))
