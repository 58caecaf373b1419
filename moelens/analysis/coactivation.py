"""Expert co-activation within a layer.

Why two variants: the definition counts all C(k, 2) pairs of a token's experts; OLMoE's figure code walks
the rank-ordered list with ``pairwise`` and so counts only rank-adjacent pairs. They agree for k = 2 and
differ (and depend on rank order) for k > 2, so the adjacent one is labelled as a figure reproduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import group_expert_counts, result
from moelens.analysis.chunked import Chunked, Context, compute
from moelens.analysis.data import RoutingData
from moelens.analysis.npmi import npmi_from_counts
from moelens.errors import InputError

VARIANTS = {"all": "all pairs (definition)", "adjacent": "OLMoE adjacent-pair (figure reproduction)"}


def pair_counts(experts: np.ndarray, n_experts: int, variant: str = "all") -> np.ndarray:
    """Symmetric ``[E, E]`` number of tokens in which i and j co-occur (``all``) or are rank-adjacent among
    the token's routed experts (``adjacent``; not-routed slots are skipped, as the reference's lists never
    hold them)."""
    return grouped_pair_counts(experts, n_experts, variant=variant)[0]


def grouped_pair_counts(experts: np.ndarray, n_experts: int, group: np.ndarray | None = None, n_groups: int = 1, variant: str = "all") -> np.ndarray:
    """`pair_counts` per token group, ``[n_groups, E, E]`` (``group`` -1 = leave the token out), in one
    compiled pass over each token's slot pairs (C(k, 2) of them, so 28 per token at k = 8)."""
    from moelens.analysis._kernels import jit, pair_slot_counts

    if variant not in VARIANTS:
        raise InputError(f"variant must be one of {list(VARIANTS)}, not {variant!r}")
    if experts.size and int(experts.max()) >= n_experts:
        raise InputError(f"expert id {int(experts.max())} >= n_experts {n_experts}")
    if variant == "adjacent":  # routed slots first, rank order kept: then adjacent = slots (r, r + 1)
        experts = np.take_along_axis(experts, np.argsort(experts < 0, axis=1, kind="stable"), axis=1)
    counts = np.zeros((n_groups, n_experts, n_experts), np.int64)
    jit(pair_slot_counts)(experts, np.zeros(0, np.int64) if group is None else np.asarray(group), n_experts, variant == "adjacent", counts)
    return counts + counts.transpose(0, 2, 1)


@dataclass(frozen=True)
class CoactivationCounts(Chunked):
    """Per layer ``[E]`` tokens per expert and ``[E, E]`` pair counts, and the token total. Per-batch
    counting also keeps the bincount's working set small (one batch's keys, not the run's)."""

    variant: str = "all"

    def map(self, batch: RoutingData) -> dict[str, Any]:
        if self.variant not in VARIANTS:
            raise InputError(f"variant must be one of {list(VARIANTS)}, not {self.variant!r}")
        return {
            "n_tokens": batch.n_tokens,
            "n": [group_expert_counts(batch.experts[li], int(E))[0] for li, E in enumerate(batch.n_experts)],
            "n_ij": [pair_counts(batch.experts[li], int(E), self.variant) for li, E in enumerate(batch.n_experts)],
        }

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        from moelens.analysis.summary_partials import coactivation_counts

        return coactivation_counts(store, ctx) if self.variant == "all" else None

    def finish(self, partial: dict[str, Any], ctx: Context) -> pd.DataFrame:
        data = ctx.meta
        frames = []
        for li, layer in enumerate(data.layer_ids):
            E, k = int(data.n_experts[li]), int(data.top_k[li])
            n, n_ij = partial["n"][li], partial["n_ij"][li]
            i, j = np.nonzero(~np.eye(E, dtype=bool))
            with np.errstate(invalid="ignore", divide="ignore"):
                frames.append(
                    pd.DataFrame(
                        {
                            "layer": int(layer),
                            "expert_i": i,
                            "expert_j": j,
                            "n_i": n[i],
                            "n_ij": n_ij[i, j],
                            "p_j_given_i": n_ij[i, j] / n[i],
                            "jaccard": n_ij[i, j] / (n[i] + n[j] - n_ij[i, j]),
                            "npmi": npmi_from_counts(n_ij[i, j], n[i], n[j], partial["n_tokens"])[1],
                            "baseline": (k - 1) / (E - 1) if E > 1 else np.nan,
                        }
                    )
                )
        columns = ["layer", "expert_i", "expert_j", "n_i", "n_ij", "p_j_given_i", "jaccard", "npmi", "baseline"]
        df = pd.concat(frames) if frames else pd.DataFrame(columns=columns)
        return result(
            df, data, "coactivation", variant=self.variant, variant_label=VARIANTS.get(self.variant),
            reference="OLMoE (arXiv 2409.02060) §5 / scripts/run_moe_analysis.py do_coactivation_analysis",
        )  # fmt: skip


def coactivation(source: Any, run: int | None = None, *, phase: str | None = None, variant: str = "all", **how: Any) -> pd.DataFrame:
    """Per layer and ordered pair i ≠ j: ``n_i`` tokens with i in the top-k, ``n_ij`` co-occurrences,
    ``p_j_given_i`` = n_ij / n_i (asymmetric), ``jaccard`` = n_ij / (n_i + n_j − n_ij), expert–expert
    ``npmi`` and the uniform ``baseline`` (k−1)/(E−1). ``variant='adjacent'`` reproduces OLMoE's
    ``do_coactivation_analysis`` (rank-adjacent pairs only)."""
    if variant not in VARIANTS:
        raise InputError(f"variant must be one of {list(VARIANTS)}, not {variant!r}")
    return compute(CoactivationCounts(variant), source, run, phase=phase, **how)
