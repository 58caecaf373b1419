"""SCH — Segment Cache best Hit rate, with an LRU baseline (moe-lrc, arXiv 2505.16056).

SCH is the hit rate of an expert cache whose eviction can look m tokens ahead (evict the expert with the
fewest uses in the next m tokens, ties by least recently used), for every cache size at once. It is
sequential by nature (the cache state depends on every earlier access), so the per-sequence simulation is
a compiled loop (`_kernels.stack_hits`). Access order inside a token is the stored rank order (descending
gate weight), as the reference feeds it; it changes the curve (§8.4).

Conventions kept from the reference: positions are read before a token's accesses; a first-seen expert is
credited at the number of distinct experts seen so far (a pre-warmed cache, so the hit rate at C = E is 1);
the layer curve is the unweighted mean of per-sequence curves. The bootstrap CI (§8.3) is not computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from moelens.analysis._common import Source, resolve, result
from moelens.analysis._kernels import jit, parallel_map, stack_hits, workers
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

LEVELS = ("layer", "model")

#: Wall-time budget of the default (seconds of compiled loop per worker thread) above which every n-th
#: sequence is simulated instead of all. Pass ``sample_every=1`` to always use every sequence.
TIME_BUDGET_S = 4.0

#: Cost of one access (ns): a fixed part plus the bubble pass, which grows with the cache universe E. Set
#: from benchmarks/analysis.py on the team's shared 2-core machines (top-2 of 16: ~25-35 ns, top-8 of 64:
#: ~60-110 ns per access), erring slow so the default stays within budget under load.
_NS_PER_ACCESS = (10.0, 1.5)


def sch(
    source: Source,
    run: int | None = None,
    *,
    lookahead: Sequence[int] = (4, 16, 64, 256),
    phase: str | None = None,
    level: str = "layer",
    lru: bool = True,
    sample_every: int | None = None,
) -> pd.DataFrame:
    """Hit-rate curves: per layer (or ``level='model'``: one cache for all layers, ids offset per layer and
    each token's accesses concatenated in layer order, §8.3), ``policy`` 'sch' for each lookahead ``m`` and
    'lru' (m = -1), for ``cache_size`` C = 1..E: ``hit_rate`` and ``cache_ratio`` = C / k (per model:
    C / Σk, the "multiple of the active experts" axis of ``42_sch_refine.py``).

    ``sample_every`` = n uses every n-th sequence (the reference uses every 16th); by default every sequence
    is used unless the estimated simulation time exceeds `TIME_BUDGET_S`, and then the smallest stride that
    fits. Layers and policies run on parallel threads.
    The stride and the number of sequences used are in the result (``n_sequences``) and its params.
    """
    if level not in LEVELS:
        raise InputError(f"level must be one of {LEVELS}, not {level!r}")
    ms = [int(m) for m in lookahead]
    if any(m < 1 for m in ms):
        raise InputError(f"lookahead lengths must be >= 1, got {ms}")
    data = resolve(source, run, phase=phase)
    caches = _caches(data, level)
    begin_all, end_all = data.segment_starts[:-1], data.segment_starts[1:]
    policies = [("sch", m) for m in ms] + ([("lru", -1)] if lru else [])
    stride = sample_every or _auto_stride(caches, len(policies), data.n_tokens)
    if stride < 1:
        raise InputError(f"sample_every must be >= 1, got {stride}")
    begin, end = begin_all[::stride], end_all[::stride]
    tasks = [(layer, access, E, k, policy, m) for layer, access, E, k in caches for policy, m in policies]
    kernel = jit(stack_hits)
    curves = parallel_map(kernel, [(access, begin, end, E, max(m, 1), policy == "sch") for _, access, E, _, policy, m in tasks])
    frames = []
    for (layer, _, E, k, policy, m), (curve, used) in zip(tasks, curves):
        sizes = np.arange(1, E + 1)
        frames.append(
            pd.DataFrame(
                {"layer": layer, "policy": policy, "m": m, "cache_size": sizes, "cache_ratio": sizes / k,
                 "hit_rate": curve / used if used else np.nan, "n_sequences": used}
            )
        )  # fmt: skip
    columns = ["layer", "policy", "m", "cache_size", "cache_ratio", "hit_rate", "n_sequences"]
    df = pd.concat(frames) if frames else pd.DataFrame(columns=columns)
    if level == "model":
        df = df.drop(columns="layer")
    return result(
        df, data, "sch", lookahead=ms, level=level, lru=lru, sample_every=stride,
        sampled=f"every {stride}th sequence ({len(begin)} of {len(begin_all)})" if stride > 1 else "every sequence",
        access_order="stored rank order (descending gate weight)", bootstrap_ci="not computed",
        reference="moe-lrc (arXiv 2505.16056) src/41_sch_calc.py calc_fsf, 50_chr_calc.py calc_lru",
    )  # fmt: skip


def _caches(data: RoutingData, level: str) -> list[tuple[int | None, np.ndarray, int, int]]:
    """(layer id, ``[T, A]`` access ids, cache universe E, active experts k) per simulated cache."""
    if level == "layer":
        return [(int(data.layer_ids[li]), data.experts[li], int(data.n_experts[li]), int(data.top_k[li])) for li in range(data.n_layers)]
    offset = np.r_[0, np.cumsum(data.n_experts)[:-1]].astype(np.int32)
    access = np.where(data.experts >= 0, data.experts + offset[:, None, None], -1).transpose(1, 0, 2).reshape(data.n_tokens, -1)
    return [(None, np.ascontiguousarray(access), int(data.n_experts.sum()), int(data.top_k.sum()))]


def _auto_stride(caches: list[tuple[int | None, np.ndarray, int, int]], n_policies: int, n_tokens: int) -> int:
    """Smallest sequence stride whose estimated simulation time fits `TIME_BUDGET_S` on `workers` threads."""
    fixed, per_expert = _NS_PER_ACCESS
    ns = sum(int((access >= 0).sum()) * (fixed + per_expert * E) for _, access, E, _ in caches) * n_policies
    return max(1, int(np.ceil(ns / (TIME_BUDGET_S * 1e9 * workers())))) if n_tokens else 1
