"""Data sources by name, and mixes of them.

A source is what `data.train` (or a `data.mix` entry) names: a generated source of SOURCES (`teacher`,
`recall`), or text (a file, a registered corpus, a hub dataset) packed into rows. Every source gives
LongTensor rows `[N, data.seq_len]`.

A mix draws rows from its sources in proportion to their weights. Its size is the largest for which no
source repeats a row: N = floor(min_i N_i / p_i) over sources i with N_i rows and weight share p_i; the
rows per source are the largest-remainder rounding of p_i · N (so the shares are exact to one row), taken
from a seeded permutation of each source. The training loop then walks the mix in epochs, so a small
source is repeated only as often as the whole mix is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import UserError
from .corpora import CORPORA, is_corpus
from .loading import HUB_SPEC, LOCAL_FORMATS, _hub_offline, load_texts
from .packing import pack_sequences
from .recall import recall_rows

# Each source's permutation in a mix gets its own seed; the stride keeps (seed, source) pairs apart.
SOURCE_SEED_STRIDE = 7919


@dataclass(frozen=True)
class SourceContext:
    """What a source may need besides the data config: the tokenizer, and the teacher (model + the folder
    its samples are stored in) for the `teacher` source."""

    data_cfg: Any
    tokenizer: Any
    teacher: Any = None
    samples_dir: Path | None = None


def _teacher_source(ctx: SourceContext, key: str) -> torch.Tensor:
    from .teacher_samples import teacher_rows

    if ctx.teacher is None or ctx.samples_dir is None:
        raise UserError(f"{key}: the 'teacher' source needs the teacher model, which this command does not load")
    return teacher_rows(ctx.teacher, ctx.tokenizer, ctx.data_cfg, ctx.samples_dir)


def _recall_source(ctx: SourceContext, key: str) -> torch.Tensor:
    recall = ctx.data_cfg.recall
    return recall_rows(recall, ctx.tokenizer, ctx.data_cfg.seq_len,
                       filler=load_texts(recall.filler, ctx.data_cfg.text_field))


# Generated sources: name -> rows. Text sources (files, corpora, hub datasets) are everything else.
SOURCES: dict[str, Callable[[SourceContext, str], torch.Tensor]] = {
    "teacher": _teacher_source,
    "recall": _recall_source,
}


def valid_kinds() -> str:
    """The kinds of source, for error messages."""
    return (f"{', '.join(SOURCES)}, a registered corpus ({', '.join(CORPORA)}), a data file "
            f"({', '.join(LOCAL_FORMATS)}), or a hub dataset NAME[:CONFIG][@SPLIT]")


def check_source(spec: str, key: str) -> None:
    """UserError (one line, listing the valid kinds) unless `spec` can name a source."""
    if not isinstance(spec, str) or not spec:
        raise UserError(f"{key}: a source name is needed; valid kinds: {valid_kinds()}")
    if spec in SOURCES or is_corpus(spec) or Path(spec).expanduser().exists():
        return
    if Path(spec).suffix.lower() in LOCAL_FORMATS:
        raise UserError(f"{key}: data file not found: {spec}")
    if not HUB_SPEC.match(spec):
        raise UserError(f"{key}: unknown source {spec!r}; valid kinds: {valid_kinds()}")
    if _hub_offline():
        raise UserError(f"{key}: unknown source {spec!r} (hub datasets are off: HF_DATASETS_OFFLINE / "
                        f"HF_HUB_OFFLINE is set); valid kinds: {valid_kinds()}")


def source_rows(spec: str, ctx: SourceContext, key: str = "data.train") -> torch.Tensor:
    """LongTensor `[N, data.seq_len]` of the source `spec` (`key` names the config key in errors)."""
    check_source(spec, key)
    if spec in SOURCES:
        return SOURCES[spec](ctx, key)
    cfg = ctx.data_cfg
    return pack_sequences(load_texts(spec, cfg.text_field), ctx.tokenizer, cfg.seq_len, source=f"{key} {spec!r}")


def _field(entry, name: str, index: int):
    value = entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)
    if value is None:
        raise UserError(f"data.mix[{index}] needs '{name}' (each entry is {{source: NAME, weight: W}})")
    return value


def mix_entries(mix) -> list[tuple[str, float]]:
    """(source, weight) pairs of `data.mix` (mappings or objects with .source / .weight), validated."""
    if mix is None or len(mix) == 0:
        raise UserError("data.mix is empty: list at least one {source: NAME, weight: W}")
    entries = []
    for index, entry in enumerate(mix):
        source, weight = _field(entry, "source", index), _field(entry, "weight", index)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or math.isinf(weight):
            raise UserError(f"data.mix[{index}] ({source}): weight must be a finite number > 0, got {weight!r}")
        check_source(source, f"data.mix[{index}]")
        if source in (s for s, _ in entries):
            raise UserError(f"data.mix lists {source!r} twice: give it one entry with the summed weight")
        entries.append((str(source), float(weight)))
    return entries


def mix_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Rows taken from each source: the largest mix with no repeated row, split by largest remainder."""
    shares = [w / sum(weights) for w in weights]
    total = min(math.floor(n / p) for n, p in zip(sizes, shares))
    exact = [p * total for p in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return [min(c, n) for c, n in zip(counts, sizes)]


def mix_rows(mix, ctx: SourceContext, seed: int) -> torch.Tensor:
    """LongTensor `[N, L]`: rows of the mix's sources in proportion to the weights, in source order (the
    caller shuffles). Deterministic in `seed`."""
    entries = mix_entries(mix)
    rows = [source_rows(source, ctx, key=f"data.mix[{i}] ({source})") for i, (source, _) in enumerate(entries)]
    counts = mix_counts([r.shape[0] for r in rows], [w for _, w in entries])
    picked = []
    for index, (source_tokens, count) in enumerate(zip(rows, counts)):
        generator = torch.Generator().manual_seed(seed * SOURCE_SEED_STRIDE + index)
        picked.append(source_tokens[torch.randperm(source_tokens.shape[0], generator=generator)[:count]])
    if sum(counts) == 0:
        raise UserError("data.mix has no rows: a source with a small weight has too few sequences for one row")
    return torch.cat(picked)  # [N, L]
