"""Tokenize documents, pack them into fixed-length sequences, shuffle, and split train / eval.

Packing concatenates documents with the tokenizer's eos token between them and cuts the stream into
rows of `seq_len` tokens, dropping the incomplete tail: every row is full, so no padding or attention
mask is needed, and every token is trained on.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import UserError

# Tokenizing in batches amortizes the fast tokenizer's per-call overhead.
DOCS_PER_BATCH = 64
# Corpora below this size tokenize in about a second: no progress bar.
PROGRESS_MIN_CHARS = 2_000_000


def tokenize_documents(texts: Sequence[str], tokenizer, *, desc: str = "tokenizing") -> list[list[int]]:
    """Token ids of each document, without special tokens."""
    show = sum(len(t) for t in texts) >= PROGRESS_MIN_CHARS
    ids: list[list[int]] = []
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=not show) as bar:
        for start in range(0, len(texts), DOCS_PER_BATCH):
            batch = list(texts[start : start + DOCS_PER_BATCH])
            ids.extend(tokenizer(batch, add_special_tokens=False)["input_ids"])
            bar.update(len(batch))
    return ids


def pack_sequences(texts: Sequence[str], tokenizer, seq_len: int, *, source: str = "data") -> torch.Tensor:
    """LongTensor `[N, seq_len]`: the documents' tokens joined by eos, cut into full rows (tail dropped).

    Raises UserError when the documents hold fewer tokens than one row; `source` names them.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"the tokenizer has no eos token, needed to separate packed documents of {source}")
    stream: list[int] = []
    for ids in tokenize_documents(texts, tokenizer, desc=f"tokenizing {source}"):
        stream.extend(ids)
        stream.append(eos)
    rows = len(stream) // seq_len
    if rows == 0:
        raise UserError(f"{source} has {len(stream)} tokens, fewer than one sequence of data.seq_len={seq_len}")
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)  # [N, L]


def shuffle_sequences(sequences: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows of `[N, L]` in a seeded random order (the same seed gives the same order everywhere)."""
    generator = torch.Generator().manual_seed(seed)
    return sequences[torch.randperm(sequences.shape[0], generator=generator)]  # [N, L]


def split_sequences(sequences: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train `[N - M, L]`, eval `[M, L]`) with M = ceil(fraction · N) rows drawn at random by `seed`.

    The split is by packed row, so a document cut at a row boundary can straddle train and eval; with
    documents much longer than a row this leaks little, and it works for any number of documents.
    """
    shuffled = shuffle_sequences(sequences, seed)
    held_out = math.ceil(fraction * sequences.shape[0])
    if held_out >= sequences.shape[0]:
        raise UserError(f"data.eval_fraction={fraction} leaves no training sequences out of {sequences.shape[0]}")
    return shuffled[held_out:], shuffled[:held_out]


def build_datasets(data_cfg, tokenizer, seed: int, *, teacher=None,
                   samples_dir: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train `[N, L]`, eval `[M, L]`) token ids for a `DataConfig`, L = data.seq_len.

    Training rows come from `data.mix` when set (see `mix.py`), else from the source `data.train`: a file,
    a registered corpus, a hub dataset, or a generated source (`recall`; `teacher`, which needs the
    teacher model as `teacher` and a folder for its samples as `samples_dir`, e.g. `<run>/teacher_samples`).
    Eval comes from `data.eval` when set, else from `data.eval_fraction` of the training rows; it is
    capped at `data.max_eval_sequences` (the first rows, so the same rows are evaluated every time).
    Training rows are shuffled by `seed` when `data.shuffle` is true.
    """
    from .mix import SourceContext, mix_rows, source_rows

    context = SourceContext(data_cfg, tokenizer, teacher=teacher, samples_dir=samples_dir)
    if data_cfg.mix is not None:
        train = mix_rows(data_cfg.mix, context, seed)
    else:
        train = source_rows(data_cfg.train, context, key="data.train")
    if data_cfg.eval:
        evaluation = source_rows(data_cfg.eval, context, key="data.eval")
    elif data_cfg.eval_fraction > 0:
        train, evaluation = split_sequences(train, data_cfg.eval_fraction, seed)
    else:
        raise UserError("no evaluation data: set data.eval to a file or corpus, or data.eval_fraction > 0")
    if data_cfg.shuffle:
        train = shuffle_sequences(train, seed)
    return train, evaluation[: data_cfg.max_eval_sequences]


def in_stage_eval(evaluation: torch.Tensor, stage_cfg) -> torch.Tensor:
    """The first `stage_cfg.eval_sequences` held-out rows (0 = all): the periodic in-stage eval can be
    cheaper than the final evaluation stage, which always uses every held-out row."""
    return evaluation[: stage_cfg.eval_sequences] if stage_cfg.eval_sequences > 0 else evaluation
