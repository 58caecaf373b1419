"""SCH — Segment Cache best Hit rate, with an LRU baseline (moe-lrc, arXiv 2505.16056).

SCH is the hit rate of an expert cache whose eviction can look m tokens ahead (evict the expert with the
fewest uses in the next m tokens, ties by least recently used), for every cache size at once. It is
sequential by nature (the cache state depends on every earlier access), so the per-sequence simulation is
a compiled loop (`_kernels.stack_hits`). Access order inside a token is the stored rank order (descending
gate weight), as the reference feeds it; it changes the curve.

Conventions kept from the reference: positions are read before a token's accesses; a first-seen expert is
credited at the number of distinct experts seen so far (a pre-warmed cache, so the hit rate at C = E is 1);
the layer curve is the unweighted mean of per-sequence curves. Its partial is a sum over sequences, so
`moelens.analysis.bootstrap` gives percentile intervals over sequence resamples (as the reference's CIs) by
streaming the sampled sequences once: ``bootstrap("sch", store, run)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import result
from moelens.analysis._kernels import jit, parallel_map, stack_hits
from moelens.analysis.chunked import Chunked, Context, compute
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

LEVELS = ("layer", "model")

#: Wall-time budget of the default (seconds of compiled loop on one thread) above which a sample of the
#: sequences is simulated instead of all. Pass ``sample_every=1`` to always use every sequence.
TIME_BUDGET_S = 8.0

#: Cost of one access (ns): a fixed part plus the bubble pass, which grows with the cache universe E. Set
#: from benchmarks/analysis.py on the team's shared 2-core machines (top-2 of 16: ~25-35 ns, top-8 of 64:
#: ~60-110 ns per access), erring slow so the default stays within budget under load.
_NS_PER_ACCESS = (10.0, 1.5)


def sampled_sequences(seq_id: np.ndarray, every: int) -> np.ndarray:
    """bool per seq_id: whether SCH simulates that sequence when sampling every ``every``-th — a sequence is
    used when a fixed 64-bit mix (splitmix64 finaliser) of its id is divisible by ``every``. It depends on
    the id alone, so the sample is the same for any batch split, shard layout or CPU count."""
    if every == 1:
        return np.ones(len(seq_id), bool)
    z = np.asarray(seq_id, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return z % np.uint64(every) == 0


@dataclass(frozen=True)
class SchCurves(Chunked):
    """Per simulated cache and policy: the sum of per-sequence hit-rate curves and the number of sequences."""

    lookahead: tuple[int, ...] = (4, 16, 64, 256)
    level: str = "layer"
    lru: bool = True
    sample_every: int | None = None

    @property
    def policies(self) -> list[tuple[str, int]]:
        return [("sch", m) for m in self.lookahead] + ([("lru", -1)] if self.lru else [])

    def prepare(self, ctx: Context) -> SchCurves:
        stride = self.sample_every or _auto_stride(ctx.meta, self.level, len(self.policies), ctx.n_tokens)
        if stride < 1:
            raise InputError(f"sample_every must be >= 1, got {stride}")
        return replace(self, sample_every=stride)

    def select_sequences(self, seq_ids: np.ndarray) -> np.ndarray:
        return sampled_sequences(seq_ids, int(self.sample_every or 1))

    def map(self, batch: RoutingData) -> dict[str, Any]:
        caches = _caches(batch, self.level)
        begin, end = batch.segment_starts[:-1], batch.segment_starts[1:]
        chosen = sampled_sequences(batch.seq_id[begin], int(self.sample_every or 1))
        calls = [(access, begin[chosen], end[chosen], E, max(m, 1), policy == "sch") for _, access, E, _ in caches for policy, m in self.policies]
        curves = parallel_map(jit(stack_hits), calls)
        return {"curves": [(c, np.int64(u)) for c, u in curves]}

    def finish(self, partial: dict[str, Any], ctx: Context) -> pd.DataFrame:
        data, stride = ctx.meta, int(self.sample_every or 1)
        tasks = [(layer, E, k, policy, m) for layer, _, E, k in _caches(data, self.level) for policy, m in self.policies]
        columns = ["layer", "policy", "m", "cache_size", "cache_ratio", "hit_rate", "n_sequences"]
        df = pd.DataFrame(columns=columns)
        if tasks:  # one frame for every (cache, policy) curve at once: a bootstrap finishes hundreds of these
            layer, E, k, policy, m = (np.array(v) for v in zip(*tasks))
            used = np.array([u for _, u in partial["curves"]], np.int64)
            sizes = np.concatenate([np.arange(1, e + 1) for e in E])
            with np.errstate(invalid="ignore", divide="ignore"):
                rates = [curve / u if u else np.full(e, np.nan) for (curve, u), e in zip(partial["curves"], E)]
            df = pd.DataFrame(
                {"layer": np.repeat(layer, E), "policy": np.repeat(policy, E), "m": np.repeat(m, E), "cache_size": sizes,
                 "cache_ratio": sizes / np.repeat(k, E), "hit_rate": np.concatenate(rates), "n_sequences": np.repeat(used, E)}
            )  # fmt: skip
        if self.level == "model":
            df = df.drop(columns="layer")
        total = len(ctx.sequences)
        chosen = int(self.select_sequences(ctx.sequences["seq_id"].to_numpy()).sum())
        return result(
            df, data, "sch", lookahead=list(self.lookahead), level=self.level, lru=self.lru, sample_every=stride,
            sampled=(f"sequences whose hashed seq_id is divisible by {stride} ({chosen} of {total})" if stride > 1 else "every sequence"),
            access_order="stored rank order (descending gate weight)",
            bootstrap_ci="none here: moelens.analysis.bootstrap.bootstrap('sch', ...) adds hit_rate_lo/_hi",
            reference="moe-lrc (arXiv 2505.16056) src/41_sch_calc.py calc_fsf, 50_chr_calc.py calc_lru",
        )  # fmt: skip


def sch(
    source: Any,
    run: int | None = None,
    *,
    lookahead: Sequence[int] = (4, 16, 64, 256),
    phase: str | None = None,
    level: str = "layer",
    lru: bool = True,
    sample_every: int | None = None,
    **how: Any,
) -> pd.DataFrame:
    """Hit-rate curves: per layer (or ``level='model'``: one cache for all layers, ids offset per layer and
    each token's accesses concatenated in layer order, as the reference's model-level cache), ``policy``
    'sch' for each lookahead ``m`` and 'lru' (m = -1), for ``cache_size`` C = 1..E: ``hit_rate`` and
    ``cache_ratio`` = C / k (per model: C / Σk, the "multiple of the active experts" axis of
    ``42_sch_refine.py``). Intervals over sequence resamples: ``bootstrap("sch", ...)``.

    ``sample_every`` = n simulates about one sequence in n: those whose hashed seq_id is divisible by n
    (`sampled_sequences`; the reference uses every 16th). By default every sequence is used unless the
    estimated single-thread simulation time (tokens × k × per-access cost) exceeds `TIME_BUDGET_S`, and
    then the smallest n that fits. The sample depends only on seq ids and the run's size, never on the CPU
    count or the batch split. The stride and the number of sequences used are in the result
    (``n_sequences``) and its params.
    """
    if level not in LEVELS:
        raise InputError(f"level must be one of {LEVELS}, not {level!r}")
    ms = tuple(int(m) for m in lookahead)
    if any(m < 1 for m in ms):
        raise InputError(f"lookahead lengths must be >= 1, got {list(ms)}")
    if sample_every is not None and sample_every < 1:
        raise InputError(f"sample_every must be >= 1, got {sample_every}")
    return compute(SchCurves(ms, level, lru, sample_every), source, run, phase=phase, **how)


def _caches(data: RoutingData, level: str) -> list[tuple[int | None, np.ndarray, int, int]]:
    """(layer id, ``[T, A]`` access ids, cache universe E, active experts k) per simulated cache."""
    if level == "layer":
        return [(int(data.layer_ids[li]), data.experts[li], int(data.n_experts[li]), int(data.top_k[li])) for li in range(data.n_layers)]
    offset = np.r_[0, np.cumsum(data.n_experts)[:-1]].astype(np.int32)
    access = np.where(data.experts >= 0, data.experts + offset[:, None, None], -1).transpose(1, 0, 2).reshape(data.n_tokens, data.n_layers * data.k_max)
    return [(None, np.ascontiguousarray(access), int(data.n_experts.sum()), int(data.top_k.sum()))]


def _auto_stride(meta: RoutingData, level: str, n_policies: int, n_tokens: int) -> int:
    """Smallest sampling stride whose estimated single-thread simulation time fits `TIME_BUDGET_S`."""
    fixed, per_expert = _NS_PER_ACCESS
    if level == "model":
        ns = n_tokens * float(meta.top_k.sum()) * (fixed + per_expert * float(meta.n_experts.sum()))
    else:
        ns = n_tokens * float((meta.top_k * (fixed + per_expert * meta.n_experts.astype(np.float64))).sum())
    return max(1, int(np.ceil(ns * n_policies / (TIME_BUDGET_S * 1e9)))) if n_tokens else 1
