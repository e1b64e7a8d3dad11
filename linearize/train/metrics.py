"""Per-step metrics as JSON lines, and a PNG of the loss curves (drawn with the Agg canvas directly,
so importing this never changes matplotlib's global backend)."""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """`metrics.jsonl`: one JSON object per optimizer step (step, loss, lr, tokens, tokens_per_s, …)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """All complete records; a half-written last line (killed process) is dropped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return records

    def truncate_after(self, step: int) -> None:
        """Keeps records with step ≤ `step`: a resumed run then appends exactly what an
        uninterrupted run would have written after that step."""
        kept = [r for r in self.read() if r["step"] <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def plot_metrics(records: list[dict], png_path: Path, title: str) -> Path:
    """Train loss (line), eval loss (markers) and learning rate against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5))
    FigureCanvasAgg(figure)
    loss_axis, lr_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    steps = [r["step"] for r in records]
    loss_axis.plot(steps, [r["loss"] for r in records], label="train loss")
    evals = [r for r in records if r.get("eval_loss") is not None]
    loss_axis.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    if records and min(r["loss"] for r in records) > 0:
        loss_axis.set_yscale("log")
    loss_axis.set_title(title)
    loss_axis.set_ylabel("loss")
    loss_axis.legend()
    lr_axis.plot(steps, [r["lr"] for r in records])
    lr_axis.set_xlabel("step")
    lr_axis.set_ylabel("lr")
    figure.tight_layout()
    figure.savefig(png_path)
    return Path(png_path)
