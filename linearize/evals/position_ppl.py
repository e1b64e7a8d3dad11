"""Perplexity by position: next-token NLL averaged over sequences, grouped into equal buckets of the
predicted token's position, so a model that forgets (or never uses) far context shows it late."""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..losses import next_token_loss


def bucket_edges(seq_len: int, buckets: int) -> list[int]:
    """Edges over predicted positions 1..seq_len−1: `buckets + 1` increasing ints."""
    if buckets < 1 or seq_len - 1 < buckets:
        raise ValueError(f"cannot split {seq_len - 1} predicted positions into {buckets} buckets")
    return [1 + round(i * (seq_len - 1) / buckets) for i in range(buckets + 1)]


@torch.no_grad()
def perplexity_by_position(model, tokens: torch.Tensor, buckets: int) -> dict:
    """tokens `[M, L]` → {"seq_len", "sequences", "buckets": [{"start", "end", "ppl"}]} where bucket
    [start, end) covers the positions of the predicted tokens."""
    device = next(model.parameters()).device
    seq_len = tokens.shape[1]
    edges = bucket_edges(seq_len, buckets)
    nll = torch.zeros(seq_len - 1, dtype=torch.float64)  # summed over sequences, per predicted position
    for row in tqdm(tokens, desc="position perplexity", leave=False):
        ids = row[None].to(device)  # [1, L]
        logits = model(input_ids=ids).logits  # [1, L, V]
        nll += next_token_loss(logits, ids, reduction="none")[0].double().cpu()  # [L−1]
    rows = []
    for start, end in zip(edges[:-1], edges[1:]):
        mean = float(nll[start - 1:end - 1].sum()) / ((end - start) * len(tokens))
        rows.append({"start": start, "end": end, "ppl": math.exp(mean)})
    return {"seq_len": seq_len, "sequences": len(tokens), "buckets": rows}
