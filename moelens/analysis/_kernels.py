"""Compiled loops for the few steps that are sequential by nature or scatter-bound.

Written as plain Python over numpy arrays and compiled with numba on first use (numba comes with
umap-learn; importing it costs ~0.5 s, so nothing here is imported until a kernel is called). Compiled code
is cached on disk, so later processes skip compilation. The plain functions stay importable as the
readable definition; tests compare them with independent reference implementations through `jit`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import numpy as np


@cache
def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled with numba (cached on disk; the GIL is released so app threads keep running)."""
    import numba

    return numba.njit(cache=True, nogil=True)(fn)


def workers() -> int:
    """Threads for independent kernel calls (the kernels release the GIL, so threads run in parallel)."""
    return max(1, os.cpu_count() or 1)


def parallel_map(fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> list[Any]:
    """``[fn(*args) for args in calls]`` on `workers` threads, results in call order."""
    if len(calls) <= 1 or workers() == 1:
        return [fn(*args) for args in calls]
    with ThreadPoolExecutor(max_workers=min(workers(), len(calls))) as pool:
        return list(pool.map(lambda args: fn(*args), calls))


def scatter_routing(
    experts: np.ndarray,
    weights: np.ndarray,
    seq: np.ndarray,
    pos: np.ndarray,
    layer: np.ndarray,
    rank: np.ndarray,
    expert: np.ndarray,
    weight: np.ndarray,
    seq0: int,
    seq_table: np.ndarray,
    seq_start: np.ndarray,
    seq_length: np.ndarray,
    slot: np.ndarray,
    layer_slot: np.ndarray,
    n_tokens: int,
    k: int,
) -> int:
    """Write routing rows into flat ``[L*T*K]`` arrays at ``(layer_slot[layer] * T + token) * K + rank``.

    A row's sequence is ``seq_table[seq - seq0]`` and its token ``slot[seq_start[sequence] + pos]``
    (-1 = not loaded: another phase, or no token row: the row is skipped). Dropped and weight-0 slots are
    written as not routed (-1, weight 0), as `mark_not_routed` does. Returns the number of rows
    with an unknown layer or a rank >= k (the caller treats any as a corrupt store).
    """
    bad = 0
    for i in range(len(seq)):
        rel = seq[i] - seq0
        if rel < 0 or rel >= len(seq_table) or seq_table[rel] < 0:
            continue
        s = seq_table[rel]
        p = pos[i]
        if p < 0 or p >= seq_length[s]:
            continue
        t = slot[seq_start[s] + p]
        if t < 0:
            continue
        lay = layer[i]
        if lay < 0 or lay >= len(layer_slot) or layer_slot[lay] < 0 or rank[i] >= k:
            bad += 1
            continue
        f = (layer_slot[lay] * n_tokens + t) * k + rank[i]
        if expert[i] < 0 or weight[i] == 0:  # dropped or weight-0: not routed (NaN weight = unknown, routed)
            experts[f] = -1
            weights[f] = 0
        else:
            experts[f] = expert[i]
            weights[f] = weight[i]
    return bad


def slot_totals(experts: np.ndarray, weights: np.ndarray, group: np.ndarray, n_groups: int, n_experts: int, out: np.ndarray) -> int:
    """Add to ``out[g * E + e]`` one (``weights`` empty) or ``float64(weights[t, r])`` per routed slot
    (expert ``e >= 0``) of a token in group ``g >= 0`` (``group`` empty = every token in group 0), visiting
    the slots of one layer's ``[T, K]`` in row-major order — the order in which ``np.bincount`` sums, so
    float64 totals are the same to the last bit. Returns the number of slots with an expert >= E or a
    token group >= n_groups (not counted; the caller rejects them)."""
    bad = 0
    count = len(weights) == 0
    for t in range(experts.shape[0]):
        g = group[t] if len(group) else 0
        if g < 0:
            continue
        if g >= n_groups:
            bad += 1
            continue
        base = g * n_experts
        for r in range(experts.shape[1]):
            e = experts[t, r]
            if e >= n_experts:
                bad += 1
            elif e >= 0:
                out[base + e] += 1 if count else weights[t, r]
    return bad


def slot_first(experts: np.ndarray, order: np.ndarray, group: np.ndarray, n_experts: int, out: np.ndarray) -> None:
    """``out[g * E + e] = min(out[...], order[t, r])`` over the routed slots of tokens in group ``g >= 0``:
    the earliest slot (in a global order) of each (group, expert) cell. ``out`` starts at int64 max."""
    for t in range(experts.shape[0]):
        g = group[t]
        if g < 0:
            continue
        for r in range(experts.shape[1]):
            e = experts[t, r]
            if e >= 0 and e < n_experts:
                f = g * n_experts + e
                if order[t, r] < out[f]:
                    out[f] = order[t, r]


def pair_slot_counts(experts: np.ndarray, group: np.ndarray, n_experts: int, adjacent: bool, out: np.ndarray) -> None:
    """Add one to ``out[g, a, b]`` for every pair of slots r < s (``adjacent``: s = r + 1 only) of a token
    in group ``g >= 0`` (``group`` empty = group 0) routed to a = experts[t, r] and b = experts[t, s]."""
    for t in range(experts.shape[0]):
        g = group[t] if len(group) else 0
        if g < 0:
            continue
        for r in range(experts.shape[1]):
            a = experts[t, r]
            if a < 0:
                continue
            for s in range(r + 1, min(r + 2, experts.shape[1]) if adjacent else experts.shape[1]):
                b = experts[t, s]
                if b >= 0:
                    out[g, a, b] += 1


def cross_slot_counts(here: np.ndarray, there: np.ndarray, group: np.ndarray, k_here: int, k_there: int, out: np.ndarray) -> int:
    """Add one to ``out[g, a, b]`` for every routed slot r < ``k_here`` of ``here`` (one layer's ``[T, K]``)
    and s < ``k_there`` of ``there`` (the next layer's) of a token in group ``g >= 0``: a = here[t, r],
    b = there[t, s] (layer-to-layer transitions; k = 1 for first choices). Returns the number of expert
    ids outside ``out`` (not counted; the caller rejects them)."""
    bad = 0
    for t in range(here.shape[0]):
        g = group[t]
        if g < 0:
            continue
        for r in range(k_here):
            a = here[t, r]
            if a < 0:
                continue
            for s in range(k_there):
                b = there[t, s]
                if b < 0:
                    continue
                if a >= out.shape[1] or b >= out.shape[2]:
                    bad += 1
                else:
                    out[g, a, b] += 1
    return bad


def shared_experts(a: np.ndarray, b: np.ndarray, n_experts: int) -> int:
    """Σ over tokens t of |{routed experts of a[t]} ∩ {routed experts of b[t]}| for two ``[T, K]`` slot
    arrays (a token's experts are distinct): each token's set from ``a`` as bits, probed by ``b``'s slots."""
    words = np.zeros(max(1, (n_experts + 63) // 64), np.uint64)
    one = np.uint64(1)
    total = 0
    for t in range(a.shape[0]):
        for r in range(a.shape[1]):
            e = a[t, r]
            if e >= 0:
                words[e >> 6] |= one << np.uint64(e & 63)
        for s in range(b.shape[1]):
            e = b[t, s]
            if e >= 0 and (words[e >> 6] >> np.uint64(e & 63)) & one:
                total += 1
        for r in range(a.shape[1]):
            e = a[t, r]
            if e >= 0:
                words[e >> 6] = 0
    return total


def window_histograms(
    experts: np.ndarray, begin: np.ndarray, end: np.ndarray, group: np.ndarray, n_groups: int, n_experts: int, m: int
) -> np.ndarray:
    """SRP window counts as a histogram ``hist[g, e, c]`` = number of stride-1 windows of
    m tokens (inside one segment of group g) in which expert e is routed c times.

    Instead of materialising every window × expert count (O(T·E)), each expert's count is tracked while the
    window slides and credited lazily for the windows it stayed unchanged: O(T·k + segments·E).
    ``experts`` is one layer ``[T, K]`` (-1 = not routed); segment s spans tokens ``[begin[s], end[s])`` and
    belongs to group ``group[s]``.
    """
    hist = np.zeros((n_groups, n_experts, m + 1), np.int64)
    count = np.zeros(n_experts, np.int64)
    since = np.zeros(n_experts, np.int64)
    K = experts.shape[1]
    for s in range(len(begin)):
        a = begin[s]
        n_win = end[s] - a - m + 1
        if n_win <= 0:
            continue
        g = group[s]
        count[:] = 0
        since[:] = 0
        for t in range(a, a + m):
            for r in range(K):
                e = experts[t, r]
                if e >= 0:
                    count[e] += 1
        for w in range(1, n_win):
            for r in range(K):
                e = experts[a + w - 1, r]  # leaves the window
                if e >= 0:
                    hist[g, e, count[e]] += w - since[e]
                    since[e] = w
                    count[e] -= 1
            for r in range(K):
                e = experts[a + w + m - 1, r]  # enters the window
                if e >= 0:
                    hist[g, e, count[e]] += w - since[e]
                    since[e] = w
                    count[e] += 1
        for e in range(n_experts):
            hist[g, e, count[e]] += n_win - since[e]
    return hist


def stack_hits(
    access: np.ndarray, begin: np.ndarray, end: np.ndarray, n_experts: int, m: int, lookahead: bool
) -> tuple[np.ndarray, int]:
    """Hit-rate curves of an expert cache for every size C = 1..E at once (Mattson priority stack,
    as the moe-lrc ``calc_fsf``/``calc_lru`` conventions).

    ``access`` is ``[T, A]`` expert ids in access order (rank order; -1 skipped); segment s spans tokens
    ``[begin[s], end[s])``. With ``lookahead`` the priority is (uses in the next m tokens, recency) — SCH;
    without, recency only — LRU. Both are packed in one int64 key, ``uses << 32 | timestamp``, kept current
    as either changes, so the bubble pass compares one number per item. Positions are read before a token's
    accesses; a first-seen expert is credited at the number of distinct experts seen so far (pre-warmed
    cache). Returns (sum over segments of each segment's curve ``cumsum(hits by position) / accesses``,
    number of segments with at least one access).
    """
    E = n_experts
    curve_sum = np.zeros(E)
    stack = np.zeros(E, np.int64)
    where = np.full(E, -1, np.int64)
    future = np.zeros(E, np.int64)
    prio = np.zeros(E, np.int64)
    stat = np.zeros(E, np.int64)
    A = access.shape[1]
    used = 0
    for s in range(len(begin)):
        a, b = begin[s], end[s]
        where[:] = -1
        future[:] = 0
        prio[:] = 0
        stat[:] = 0
        depth = 0
        clock = 0
        n_acc = 0
        if lookahead:
            for t in range(a, min(a + m, b)):
                for r in range(A):
                    if access[t, r] >= 0:
                        future[access[t, r]] += 1
        for t in range(a, b):
            seen = depth
            for r in range(A):  # credit positions as they were before this token
                e = access[t, r]
                if e < 0:
                    continue
                n_acc += 1
                if where[e] < 0:
                    stat[seen] += 1
                    seen += 1
                else:
                    stat[where[e]] += 1
            for r in range(A):
                e = access[t, r]
                if e < 0:
                    continue
                p = where[e]
                if p < 0:
                    p = depth
                    depth += 1
                if p > 0:  # one bubble pass over the items above p: the lower priority sinks
                    carry = stack[0]
                    for j in range(1, p):
                        y = stack[j]
                        if prio[y] < prio[carry]:
                            stack[j] = carry
                            where[carry] = j
                            carry = y
                    stack[p] = carry
                    where[carry] = p
                stack[0] = e
                where[e] = 0
                clock += 1
                if lookahead:
                    future[e] -= 1
                    prio[e] = (future[e] << 32) | clock
                else:
                    prio[e] = clock
            if lookahead and t + m < b:
                for r in range(A):
                    e = access[t + m, r]
                    if e >= 0:
                        future[e] += 1
                        prio[e] = (future[e] << 32) | (prio[e] & 0xFFFFFFFF)
        if n_acc > 0:
            curve_sum += np.cumsum(stat) / n_acc
            used += 1
    return curve_sum, used
