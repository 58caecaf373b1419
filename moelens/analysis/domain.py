"""Domain specialization and the per-layer "is the routing meaningful?" summary.

Why a summary beside the per-expert table: max specialization alone overlaps between random-init and
trained models (domains differ in token statistics), so the summary leads with mutual information, JS
divergence and purity, and reports every rate next to its chance value.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import consecutive_pairs, entropy, group_expert_counts, result
from moelens.analysis.chunked import Chunked, Context, compute
from moelens.analysis.data import RoutingData
from moelens.analysis.repetition import first_choice_repeats


def _label_tokens(batch: RoutingData) -> np.ndarray:
    return np.bincount(batch.label[batch.label >= 0], minlength=len(batch.label_names))


@dataclass(frozen=True)
class DomainCounts(Chunked):
    """Per layer ``[D, E]`` label × expert counts and ``[E]`` overall counts (top-k, or first choices), and
    ``[D]`` label tokens."""

    top1: bool = False
    pseudocount: float = 1.0

    def map(self, batch: RoutingData) -> dict[str, Any]:
        D = len(batch.label_names)
        slots = [batch.experts[li, :, :1] if self.top1 else batch.experts[li] for li in range(batch.n_layers)]
        return {
            "n_d": _label_tokens(batch),
            "by_label": [group_expert_counts(x, int(E), batch.label, D) for x, E in zip(slots, batch.n_experts)],
            "overall": [group_expert_counts(x, int(E))[0] for x, E in zip(slots, batch.n_experts)],
        }

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        from moelens.analysis.summary_partials import domain_counts

        return domain_counts(store, ctx, self.top1)

    def finish(self, partial: dict[str, Any], ctx: Context) -> pd.DataFrame:
        data = ctx.meta
        D = len(data.label_names)
        n_d = partial["n_d"].astype(np.float64)
        frames = []
        for li, layer in enumerate(data.layer_ids):
            E = int(data.n_experts[li])
            by_label, overall = partial["by_label"][li], partial["overall"][li]
            baseline = (1.0 if self.top1 else float(data.top_k[li])) / E
            alpha = self.pseudocount
            share_d = (by_label + alpha) / (by_label.sum(axis=1, keepdims=True) + alpha * E)
            share_all = (overall + alpha) / (overall.sum() + alpha * E)
            with np.errstate(invalid="ignore", divide="ignore"):
                spec = by_label / n_d[:, None]
                frames.append(
                    pd.DataFrame(
                        {
                            "layer": int(layer),
                            "expert": np.tile(np.arange(E), D),
                            "label": np.repeat(np.array(data.label_names, dtype=object), E),
                            "n_label_tokens": np.repeat(n_d.astype(np.int64), E),
                            "count": by_label.ravel(),
                            "spec": spec.ravel(),
                            "baseline": baseline,
                            "lift": (spec / baseline).ravel(),
                            "log2_ratio": np.log2(share_d / share_all).ravel(),
                        }
                    )
                )
        columns = ["layer", "expert", "label", "n_label_tokens", "count", "spec", "baseline", "lift", "log2_ratio"]
        df = pd.concat(frames) if frames else pd.DataFrame(columns=columns)
        return result(
            df, data, "domain_specialization", top1=self.top1, pseudocount=self.pseudocount,
            reference="OLMoE (arXiv 2409.02060) §5, scripts/run_routing_analysis.py",
        )  # fmt: skip


def domain_specialization(
    source: Any, run: int | None = None, *, phase: str | None = None, top1: bool = False, pseudocount: float = 1.0, **how: Any
) -> pd.DataFrame:
    """Per (layer, expert, label): ``spec`` = N_{E,D} / N_D, the share of the label's tokens that have the
    expert in their top-k (rank 0 only with ``top1``), against ``baseline`` k/E (1/E), ``lift`` =
    spec/baseline, and ``log2_ratio`` = log2 of the label's load share over the overall load share (all
    tokens), both smoothed with ``pseudocount`` per expert (moe-vis style). OLMoE
    ``scripts/run_routing_analysis.py``. Unlabelled tokens count only in the
    overall load.
    """
    return compute(DomainCounts(top1, pseudocount), source, run, phase=phase, **how)


@dataclass(frozen=True)
class DomainSummary(Chunked):
    """Per layer: label × expert top-k and first-choice counts, pooled first-choice and top-k counts, and
    the consecutive-pair first-choice repeat counts."""

    def map(self, batch: RoutingData) -> dict[str, Any]:
        D = len(batch.label_names)
        pairs = consecutive_pairs(batch)
        out: dict[str, Any] = {"n_d": _label_tokens(batch), "topk": [], "top1": [], "q": [], "used": [], "pairs": []}
        for li, E in enumerate(batch.n_experts):
            E = int(E)
            valid, same = first_choice_repeats(batch, li, pairs)
            out["topk"].append(group_expert_counts(batch.experts[li], E, batch.label, D))
            out["top1"].append(group_expert_counts(batch.experts[li, :, :1], E, batch.label, D))
            out["q"].append(group_expert_counts(batch.experts[li, :, :1], E)[0])
            out["used"].append(group_expert_counts(batch.experts[li], E)[0])
            out["pairs"].append(np.array([valid.sum(), same.sum()], np.int64))
        return out

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        """Exact for every phase filter: label × expert counts from ``expert_counts``, label sizes from
        ``tokens``, pair counts from ``repetition``."""
        from moelens.analysis.summary_partials import label_tables, pair_counts_by_label

        tables, pairs = label_tables(store, ctx, "count", "top1"), pair_counts_by_label(store, ctx)
        if tables is None or pairs is None:
            return None
        n, (topk, top1) = tables
        D = len(ctx.meta.label_names)
        return {
            "n_d": n[:D], "topk": [a[:D] for a in topk], "top1": [a[:D] for a in top1],
            "q": [a.sum(axis=0) for a in top1], "used": [a.sum(axis=0) for a in topk],
            "pairs": [p[:2].sum(axis=1) for p in pairs],
        }  # fmt: skip

    def finish(self, partial: dict[str, Any], ctx: Context) -> pd.DataFrame:
        data = ctx.meta
        n_d = partial["n_d"].astype(np.float64)
        rows = []
        for li, layer in enumerate(data.layer_ids):
            E = int(data.n_experts[li])
            topk, top1, q = partial["topk"][li], partial["top1"][li], partial["q"][li]
            valid, same = partial["pairs"][li]
            with np.errstate(invalid="ignore", divide="ignore"):
                spec = topk / n_d[:, None]
                used = spec.sum(axis=0) > 0
                rows.append(
                    {
                        "layer": int(layer),
                        "n_labels": int((n_d > 0).sum()),
                        "mi_ratio": _mi_ratio(top1),
                        "js_bits": _mean_js_bits(topk),
                        "purity": float((spec.max(axis=0)[used] / spec.sum(axis=0)[used]).mean()) if used.any() else np.nan,
                        "chance_purity": 1.0 / (n_d > 0).sum() if (n_d > 0).any() else np.nan,
                        "max_spec": float(np.nanmax(spec)) if (n_d > 0).any() else np.nan,
                        "uniform_spec": float(data.top_k[li]) / E,
                        "dead_experts": int((partial["used"][li] == 0).sum()),
                        "same_top1": float(same / valid) if valid else np.nan,
                        "uniform_top1": 1.0 / E,
                        "sum_sq_top1": float(((q / q.sum()) ** 2).sum()) if q.sum() else np.nan,
                    }
                )
        return result(pd.DataFrame(rows), data, "domain_summary", reference="[moelens] is the routing meaningful: MI, JS divergence, purity over labels (OLMoE arXiv 2409.02060 §5)")


def domain_summary(source: Any, run: int | None = None, *, phase: str | None = None, **how: Any) -> pd.DataFrame:
    """Per layer, the routing-quality table of the bundled demo (README, "The bundled demo"):

    * ``mi_ratio`` = MI(label; top-1 expert) / H(label) over labelled tokens with a first choice;
    * ``js_bits`` = mean pairwise Jensen–Shannon divergence (bits) of the labels' top-k load-share vectors;
    * ``purity`` = mean over used experts of max_D spec(e, D) / Σ_D spec(e, D) — spec normalised per label, so
      chance is ``chance_purity`` = 1/D whatever the label sizes;
    * ``max_spec`` = max over (expert, label) of the top-k spec, against ``uniform_spec`` = k/E;
    * ``dead_experts`` (no routed slot in the data), ``same_top1`` = consecutive same first choice rate
      against ``uniform_top1`` = 1/E and the i.i.d. expectation ``sum_sq_top1`` = Σ q² of first-choice shares.
    """
    return compute(DomainSummary(), source, run, phase=phase, **how)


def _mi_ratio(joint_counts: np.ndarray) -> float:
    """MI(row; column) / H(row) of a contingency table (NaN if H(row) = 0). Marginals are taken from the
    integer counts so a single-row table has exactly zero entropy."""
    total = joint_counts.sum()
    if total == 0:
        return float("nan")
    h_row = entropy(joint_counts.sum(axis=1) / total)
    if h_row == 0:
        return float("nan")
    mi = h_row + entropy(joint_counts.sum(axis=0) / total) - entropy(joint_counts.ravel() / total)
    return float(mi / h_row)


def _mean_js_bits(load: np.ndarray) -> float:
    """Mean Jensen–Shannon divergence (base 2) over all pairs of rows with any load."""
    rows = load[load.sum(axis=1) > 0]
    dist = rows / rows.sum(axis=1, keepdims=True)
    values = [
        entropy((a + b) / 2, base=2) - (entropy(a, base=2) + entropy(b, base=2)) / 2 for a, b in combinations(dist, 2)
    ]
    return float(np.mean(values)) if values else float("nan")

