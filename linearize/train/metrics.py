"""Per-step metrics as JSON lines, and a PNG of the loss curves (drawn with the Agg canvas directly,
so importing this never changes matplotlib's global backend)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..files import faults_named, save_figure, write_jsonl


# How much of the log's end `append` reads to find the last step written: many records' worth.
TAIL_BYTES = 1 << 16


def _record(line) -> dict | None:
    """A metrics record (a JSON object with an integer step), or None for anything else."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
    return record if ok else None


class MetricsLog:
    """`metrics.jsonl`: one JSON object per optimizer step (step, loss, lr, tokens, tokens_per_s, …),
    exactly one per step, in step order."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """All complete records; a half-written last line (killed process) and anything after a line
        that is not a record are dropped."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            record = _record(line)
            if record is None:
                break
            records.append(record)
        return records

    def truncate_after(self, step: int) -> None:
        """Keeps one record per step ≤ `step` (the last written, should two runs ever have appended the
        same step), in step order: a resumed run then appends exactly what an uninterrupted run would
        have written after that step. Atomic (`linearize.files`)."""
        by_step = {r["step"]: r for r in self.read() if r["step"] <= step}
        kept = [by_step[s] for s in sorted(by_step)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.path, kept)

    def last_step(self):
        """The step of the last complete record on disk (None if there is none), read from the tail."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(max(0, handle.seek(0, os.SEEK_END) - TAIL_BYTES))
                lines = handle.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return None
        records = [r for r in map(_record, lines) if r is not None]
        return records[-1]["step"] if records else None

    def append(self, record: dict) -> None:
        """Appends one step's record; refuses a step the log already holds (another process writing the
        same stage directory) instead of logging it twice."""
        last = self.last_step()
        if last is not None and record["step"] <= last:
            raise UserError(f"{self.path} already holds step {last}, this run is at step {record['step']}: "
                            "another run is writing to the same stage directory")
        # An append, not a rewrite: a fault can leave half a last line, which `read` drops.
        with faults_named(self.path), open(self.path, "a") as handle:
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
    return save_figure(figure, Path(png_path), dpi=figure.dpi)
