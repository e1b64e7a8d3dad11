"""Deterministic data order: the batch at a given cursor depends only on (seed, cursor), so a resumed
run reads exactly the sequences an uninterrupted run would have read."""
from __future__ import annotations

from functools import lru_cache

import torch

# Each epoch gets its own permutation seed; the stride keeps (seed, epoch) pairs from colliding.
EPOCH_SEED_STRIDE = 1_000_003


@lru_cache(maxsize=4)
def _epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_samples)
    generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(num_samples, generator=generator)


def sample_indices(cursor: int, count: int, num_samples: int, seed: int, shuffle: bool = True) -> torch.Tensor:
    """Indices `[count]` of the sequences at stream positions cursor .. cursor+count−1.

    The stream walks a fresh permutation of the `num_samples` sequences every epoch."""
    if num_samples <= 0:
        raise ValueError("the training set is empty")
    positions = range(cursor, cursor + count)
    return torch.stack(
        [_epoch_order(num_samples, seed, p // num_samples, shuffle)[p % num_samples] for p in positions]
    )
