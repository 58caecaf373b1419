"""Expert load, balance and shared-expert gates.

Load is the first thing to look at and the easiest to get wrong: counts are never capped, the mean in max/mean runs over all E experts (dead ones included),
and count- and gate-weighted loads are reported side by side because they can disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import entropy, group_expert_counts, label_groups, result
from moelens.analysis.chunked import Chunked, Context, High, Low, compute
from moelens.analysis.data import RoutingData


@dataclass(frozen=True)
class ExpertCounts(Chunked):
    """Per layer ``[G, E]`` routed-slot counts and gate mass, and ``[G]`` tokens, G = label groups (all
    labels + unlabelled) or one group. The partial of `expert_load` and `layer_balance`."""

    by_label: bool = False
    label_summaries = True  # its summaries are keyed by label: a label filter answers from them too

    def map(self, batch: RoutingData) -> dict[str, Any]:
        group, n_groups = label_groups(batch, self.by_label)
        return {
            "n_tok": np.bincount(group, minlength=n_groups),
            "count": [group_expert_counts(batch.experts[li], int(E), group, n_groups) for li, E in enumerate(batch.n_experts)],
            "mass": [group_expert_counts(batch.experts[li], int(E), group, n_groups, weights=batch.weights[li]) for li, E in enumerate(batch.n_experts)],
        }  # fmt: skip

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        from moelens.analysis.summary_partials import expert_counts

        return expert_counts(store, ctx, self.by_label)

    def finish(self, partial: dict[str, Any], ctx: Context) -> pd.DataFrame:
        return _load_table(partial, ctx.meta, self.by_label)


def expert_load(source: Any, run: int | None = None, *, phase: str | None = None, by_label: bool = False, **how: Any) -> pd.DataFrame:
    """Per (layer, expert) [, label]: ``count`` of routed slots n_e, ``activation_rate`` n_e/|U| (sums to k
    over experts when every token has k routed slots), ``share`` n_e/Σn, ``gate_mass`` Σ gate weight and
    ``gate_share``. With ``by_label`` U is each label's tokens (unlabelled tokens form the
    label None). Rates over an empty token set are NaN. ``how``: engine options of `compute`.
    """
    return compute(ExpertCounts(by_label), source, run, phase=phase, **how)


def _load_table(partial: dict[str, Any], data: RoutingData, by_label: bool) -> pd.DataFrame:
    names: list[str | None] = [*data.label_names, None] if by_label else [None]
    n_groups = len(names)
    n_tok = partial["n_tok"].astype(np.float64)
    frames = []
    for li, layer in enumerate(data.layer_ids):
        E = int(data.n_experts[li])
        count, mass = partial["count"][li], partial["mass"][li]
        with np.errstate(invalid="ignore", divide="ignore"):
            frame = pd.DataFrame(
                {
                    "layer": int(layer),
                    "expert": np.tile(np.arange(E), n_groups),
                    "label": np.repeat(np.array(names, dtype=object), E),
                    "count": count.ravel(),
                    "activation_rate": (count / n_tok[:, None]).ravel(),
                    "share": (count / count.sum(axis=1, keepdims=True)).ravel(),
                    "gate_mass": mass.ravel(),
                    "gate_share": (mass / mass.sum(axis=1, keepdims=True)).ravel(),
                }
            )
        present = np.repeat(n_tok > 0, E) if by_label else np.ones(len(frame), bool)
        frames.append(frame[present])
    df = pd.concat(frames) if frames else pd.DataFrame(columns=["layer", "expert", "label", "count"])
    if not by_label:
        df = df.drop(columns="label")
    return result(df, data, "expert_load", by_label=by_label, reference="Switch Transformer (arXiv 2101.03961) load balance; OLMoE (arXiv 2409.02060) §5")


@dataclass(frozen=True)
class LayerBalance(ExpertCounts):
    """`layer_balance` from the pooled `ExpertCounts` partial."""

    def finish(self, partial: dict[str, Any], ctx: Context) -> pd.DataFrame:
        return _balance_table(partial, ctx.meta)


def layer_balance(source: Any, run: int | None = None, *, phase: str | None = None, **how: Any) -> pd.DataFrame:
    """Per layer: ``entropy`` H = −Σ f ln f of the load shares (nats), ``norm_entropy`` H/ln E,
    ``effective_experts`` exp(H), ``max_mean`` E·max f, ``maxvio`` max_mean − 1 (arXiv 2408.15664),
    ``cv`` population std/mean of the counts, ``dead_experts`` (count 0).
    NaN where the layer has no routed slot."""
    return compute(LayerBalance(), source, run, phase=phase, **how)


def _balance_table(partial: dict[str, Any], data: RoutingData) -> pd.DataFrame:
    n_tokens = int(partial["n_tok"].sum())
    rows = []
    for li, layer in enumerate(data.layer_ids):
        E = int(data.n_experts[li])
        n = partial["count"][li][0]
        total = n.sum()
        row = {"layer": int(layer), "n_experts": E, "top_k": int(data.top_k[li]), "n_tokens": n_tokens}
        if total == 0:
            row.update(dict.fromkeys(["entropy", "norm_entropy", "effective_experts", "max_mean", "maxvio", "cv"], np.nan))
            row["dead_experts"] = E if n_tokens else np.nan
        else:
            f = n / total
            h = float(entropy(f))
            row.update(
                entropy=h,
                norm_entropy=h / np.log(E) if E > 1 else np.nan,
                effective_experts=float(np.exp(h)),
                max_mean=float(E * f.max()),
                maxvio=float(E * f.max() - 1),
                cv=float(n.std() / n.mean()),
                dead_experts=int((n == 0).sum()),
            )
        rows.append(row)
    return result(pd.DataFrame(rows), data, "layer_balance", reference="Switch Transformer (arXiv 2101.03961) load balance; OLMoE (arXiv 2409.02060) §5")


@dataclass(frozen=True)
class SharedGates(Chunked):
    """Per layer: gate count, mean and sum of squared deviations (merged with Chan et al.'s pairwise update,
    exact up to rounding), min and max."""

    def map(self, batch: RoutingData) -> Any:
        L = batch.n_layers
        n, mean, m2 = np.zeros(L), np.zeros(L), np.zeros(L)
        low, high = np.full(L, np.inf), np.full(L, -np.inf)
        for li in range(L if batch.shared_gate is not None else 0):
            gate = batch.shared_gate[li]  # type: ignore[index]
            gate = gate[~np.isnan(gate)].astype(np.float64)
            if len(gate):
                n[li], mean[li], m2[li] = len(gate), gate.mean(), ((gate - gate.mean()) ** 2).sum()
                low[li], high[li] = gate.min(), gate.max()
        return _Moments(n, mean, m2), Low(low), High(high)

    def finish(self, partial: Any, ctx: Context) -> pd.DataFrame:
        moments, low, high = partial
        columns = ["layer", "n_tokens", "mean_gate", "std_gate", "min_gate", "max_gate"]
        rows = [
            [int(layer), int(moments.n[li]), moments.mean[li], np.sqrt(moments.m2[li] / moments.n[li]), low.value[li], high.value[li]]
            for li, layer in enumerate(ctx.meta.layer_ids) if moments.n[li] > 0
        ]  # fmt: skip
        return result(pd.DataFrame(rows, columns=columns), ctx.meta, "shared_expert_stats", reference="[moelens]")


class _Moments:
    """Count, mean and M2 per layer; `merge` is the parallel variance update (Chan, Golub & LeVeque 1979)."""

    def __init__(self, n: np.ndarray, mean: np.ndarray, m2: np.ndarray):
        self.n, self.mean, self.m2 = n, mean, m2

    def merge(self, other: _Moments) -> _Moments:
        n = self.n + other.n
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other.mean - self.mean
            frac = np.where(n > 0, other.n / n, 0.0)
        return _Moments(n, self.mean + delta * frac, self.m2 + other.m2 + delta**2 * self.n * frac)


def shared_expert_stats(source: Any, run: int | None = None, *, phase: str | None = None, **how: Any) -> pd.DataFrame:
    """Per layer with a shared expert: ``n_tokens`` with a recorded gate and the gate's ``mean``, ``std``
    (population), ``min`` and ``max``. Empty when the run has no shared experts. [moelens]"""
    return compute(SharedGates(), source, run, phase=phase, **how)
