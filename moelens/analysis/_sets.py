"""Expert sets as bitsets, so "do two tokens share an expert" and "|S ∩ S'|" are one AND and a popcount
per token pair instead of k² comparisons (k = 8 would otherwise cost 64 comparisons per pair)."""

from __future__ import annotations

import numpy as np


def bitsets(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """``uint64[T, W]`` set of each token's routed experts (one layer's ``[T, K]``; -1 ignored).

    A token's experts are distinct, so summing their bits equals OR-ing them (and is ~2x faster)."""
    n_words = max(1, -(-n_experts // 64))
    bit = np.left_shift(np.uint64(1), experts.astype(np.uint64) & np.uint64(63))
    word = np.where(experts >= 0, experts >> 6, -1)
    out = np.empty((len(experts), n_words), np.uint64)
    for w in range(n_words):
        out[:, w] = (bit * (word == w)).sum(axis=1, dtype=np.uint64)
    return out


def intersection_size(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``|A ∩ B|`` row by row for two bitset arrays of the same shape."""
    return np.bitwise_count(a & b).sum(axis=1, dtype=np.int64)
