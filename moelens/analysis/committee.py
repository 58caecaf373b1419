"""Standing Committee — COMMITTEEAUDIT (Wang et al., arXiv 2601.03425).

The question: is there a small set of experts per layer that every domain relies on (a "standing
committee"), rather than domain specialists? Stage I ranks experts per (domain, layer) by an Expert
Contribution Index; Stage III keeps the experts ranked consistently high in (almost) every domain's list.

Variants, because the shipped code and the paper differ: ECI ``minmax`` (shipped code: min–max
normalised mean weight × frequency), ``frequency`` (``get_frequency_data.py``), ``expected`` (the paper's
E[G_i]). The audit takes the true E for the influence ratio (the reference guesses it from the largest id:
wrong for E = 8 or any E not in {64, 128, 256}); the reference's value is reported beside it. Stage II
(silhouette filtering of domains) is not in the shipped audit and not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import ceil
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import group_expert_counts, result
from moelens.analysis.chunked import HOW_OPTIONS, Chunked, Context, Fused, High, Low, compute_partial
from moelens.analysis.data import PHASES, RoutingData
from moelens.errors import InputError

ECI_VARIANTS = ("minmax", "frequency", "expected")
UNITS = ("last_prompt_token", "token")
_REFERENCE = "CommitteeAudit (arXiv 2601.03425) get_frequency_and_weight_data.py, Audit_Committee.py"


def contribution_index(experts: np.ndarray, weights: np.ndarray, n_experts: int, variant: str = "minmax") -> np.ndarray:
    """ECI of every expert over N units (``[N, K]`` ids and gate weights of one layer and domain).

    ``minmax``: f_i · mean_x (W_xi − min_x W_xi) / (max_x W_xi − min_x W_xi + 1e-6) with W_xi the gate weight
    if selected else 0; ``frequency``: f_i; ``expected``: mean_x W_xi. (CommitteeAudit, arXiv 2601.03425, Stage I.)
    """
    stats = eci_stats(experts, weights, np.zeros(len(experts), np.int64), 1, n_experts)
    return eci_from_stats(*(v[0] for v in stats), variant)


def eci_stats(experts: np.ndarray, weights: np.ndarray, group: np.ndarray, n_groups: int, n_experts: int) -> tuple[np.ndarray, ...]:
    """The mergeable statistics of the ECI per group: units N [G], selections and gate mass [G, E] (sums),
    largest weight (max) and smallest selected weight (min) [G, E]."""
    n = np.bincount(group[group >= 0], minlength=n_groups)
    selected = group_expert_counts(experts, n_experts, group, n_groups)
    mass = group_expert_counts(experts, n_experts, group, n_groups, weights=weights)
    routed = (experts >= 0) & (group >= 0)[:, None]
    key = (np.broadcast_to(group[:, None], experts.shape).astype(np.int64) * n_experts + experts)[routed]
    w = weights[routed].astype(np.float64)
    top = np.zeros(n_groups * n_experts)
    np.maximum.at(top, key, w)  # a column with an unselected unit also holds 0 (weights are >= 0)
    low = np.full(n_groups * n_experts, np.inf)
    np.minimum.at(low, key, w)
    return n, selected, mass, top.reshape(n_groups, n_experts), low.reshape(n_groups, n_experts)


def eci_from_stats(n: Any, selected: np.ndarray, mass: np.ndarray, top: np.ndarray, low: np.ndarray, variant: str) -> np.ndarray:
    """ECI of one group from its `eci_stats`."""
    if variant not in ECI_VARIANTS:
        raise InputError(f"eci must be one of {ECI_VARIANTS}, not {variant!r}")
    N = int(n)
    if N == 0:
        return np.zeros(len(selected))
    if variant == "frequency":
        return selected / N
    if variant == "expected":
        return mass / N
    low = np.where(selected == N, low, 0.0)
    return (mass - N * low) / (top - low + 1e-6) / N * (selected / N)


def unit_tokens(data: RoutingData, unit: str) -> np.ndarray:
    """Token indices Stage I profiles: each sequence's last prompt token (the reference records one per
    prompt) or every token."""
    if unit == "token":
        return np.arange(data.n_tokens)
    if unit != "last_prompt_token":
        raise InputError(f"unit must be one of {UNITS}, not {unit!r}")
    prompt = np.flatnonzero(data.phase == PHASES.index("prompt"))
    last = np.r_[data.seq_id[prompt][1:] != data.seq_id[prompt][:-1], True] if len(prompt) else np.zeros(0, bool)
    return prompt[last]


@dataclass(frozen=True)
class EciStats(Chunked):
    """Per layer the `eci_stats` of each label's units (the partial of Stage I)."""

    unit: str = "last_prompt_token"

    def map(self, batch: RoutingData) -> list[tuple[Any, ...]]:
        units = unit_tokens(batch, self.unit)
        label, D = batch.label[units], len(batch.label_names)
        out = []
        for li, E in enumerate(batch.n_experts):
            n, selected, mass, top, low = eci_stats(batch.experts[li, units], batch.weights[li, units], label, D, int(E))
            out.append((n, selected, mass, High(top), Low(low)))
        return out

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        """``unit="last_prompt_token"`` (any phase filter: the units are prompt tokens) from ``committee_units``;
        every token's largest and smallest gate weight is in no summary, so ``unit="token"`` is streamed."""
        from moelens.analysis.summary_partials import committee_units

        return committee_units(store, ctx) if self.unit == "last_prompt_token" else None


def _lists_table(stats: list[tuple[Any, ...]], data: RoutingData, eci: str, list_length: int | None, decimals: int | None) -> pd.DataFrame:
    """Stage I rows from merged `EciStats`: experts ordered by the unrounded ECI (ties: lower id)."""
    frames = []
    for li, layer in enumerate(data.layer_ids):
        E = int(data.n_experts[li])
        K = min(int(list_length or data.top_k[li]), E)
        n, selected, mass, top, low = stats[li]
        for d, name in enumerate(data.label_names):
            if not n[d]:
                continue
            value = eci_from_stats(n[d], selected[d], mass[d], top.value[d], low.value[d], eci)
            order = np.lexsort((np.arange(E), -value))[:K]  # unrounded, as torch.topk in the reference
            shown = value[order] if decimals is None else np.round(value[order], decimals)
            frames.append(pd.DataFrame({"layer": int(layer), "domain": name, "rank": np.arange(1, K + 1), "expert": order, "value": shown}))
    columns = ["layer", "domain", "rank", "expert", "value"]
    return pd.concat(frames) if frames else pd.DataFrame(columns=columns)


def committee_lists(
    source: Any,
    run: int | None = None,
    *,
    eci: str = "minmax",
    list_length: int | None = None,
    unit: str = "last_prompt_token",
    decimals: int | None = 4,
    phase: str | None = None,
    **how: Any,
) -> pd.DataFrame:
    """Stage I: per (layer, label) the top ``list_length`` experts by ECI (default: the layer's k) as rows
    (layer, domain, rank 1.., expert, value). Experts are ordered by the unrounded ECI (full ties: lower
    expert id), and only then are values rounded to ``decimals`` as the reference table (None keeps full
    precision). Unlabelled units are left out."""
    df, data = _lists(source, run, eci, list_length, unit, decimals, phase, how)
    return result(df, data, "committee_lists", eci=eci, list_length=list_length, unit=unit, decimals=decimals, reference=_REFERENCE)


def _lists(
    source: Any, run: int | None, eci: str, list_length: int | None, unit: str, decimals: int | None, phase: str | None, how: Any
) -> tuple[pd.DataFrame, RoutingData]:
    """Stage I lists and the run's token-free metadata."""
    _check(eci, unit)
    stats, ctx = compute_partial(EciStats(unit), source, run, phase=phase, **how)
    return _lists_table(stats, ctx.meta, eci, list_length, decimals), ctx.meta


def _check(eci: str, unit: str) -> None:
    if eci not in ECI_VARIANTS:
        raise InputError(f"eci must be one of {ECI_VARIANTS}, not {eci!r}")
    if unit not in UNITS:
        raise InputError(f"unit must be one of {UNITS}, not {unit!r}")


def reference_pool(max_expert_id: int) -> int:
    """The expert count the reference audit infers from the largest id seen."""
    for pool in (64, 128, 256):
        if max_expert_id < pool:
            return pool
    return max_expert_id + 1


def audit_committee(lists: pd.DataFrame, *, presence_ratio: float = 0.8, n_experts: int | Mapping[int, int] | None = None) -> pd.DataFrame:
    """Stage III (``Audit_Committee.py`` ``run_standing_committee_audit``) on ordered lists (layer, domain,
    rank, expert, value; expert -1 = padding). Per layer: each expert's 1-based position in every domain's
    list, K + 1 where absent (K = the layer's list length; the reference takes the first list's length, the
    same when all lists are equally long); μ, population σ², presence, avg_eci = Σ value / D (D = distinct
    domains in the input); candidates are the experts present in at least ceil(γ·D) domains, exactly as
    defined (γ = ``presence_ratio``; e.g. γ = 0.8 and D = 4 needs all 4), else the most present; committee =
    Pareto-minimal (μ, σ²) candidates sorted by μ; coverage = Σ committee avg_eci / mean list mass; ratio =
    (coverage/|C|) / ((1 − coverage)/(E − |C|)) with the true E (``n_experts``, per layer or one int; the
    reference's inferred pool if not given) and ``ratio_reference_pool`` with the pool the reference infers
    from the largest id (64/128/256). Values are not rounded; layer ids are kept (the reference shifts them
    down by one when the smallest is 1)."""
    if not 0 < presence_ratio <= 1:
        raise InputError(f"presence_ratio must be in (0, 1], not {presence_ratio}")
    domains = list(lists["domain"].unique())
    ref_pool = reference_pool(int(lists["expert"].max()) if len(lists) else 0)
    rows = []
    for layer, part in lists.groupby("layer", sort=True):
        per_domain = {d: g.sort_values("rank") for d, g in part.groupby("domain", sort=False)}
        K = max(len(g) for g in per_domain.values())
        experts = np.unique(part.loc[part["expert"] >= 0, "expert"].to_numpy())
        rank = np.full((len(experts), len(domains)), K + 1.0)
        value = np.zeros((len(experts), len(domains)))
        for j, d in enumerate(domains):
            if d not in per_domain:
                continue
            ids = per_domain[d]["expert"].to_numpy()
            real = ids >= 0
            at = np.searchsorted(experts, ids[real])
            rank[at, j] = np.arange(1, len(ids) + 1)[real]
            value[at, j] = per_domain[d]["value"].to_numpy()[real]
        mass = np.mean([g.loc[g["expert"] >= 0, "value"].sum() for g in per_domain.values()])
        E = n_experts.get(int(layer)) if isinstance(n_experts, Mapping) else n_experts
        rows.append(_audit_layer(int(layer), experts, rank, value, K, mass, presence_ratio, E or ref_pool, ref_pool))
    columns = ["layer", "committee", "size", "avg_mu", "avg_sigma_sq", "coverage", "ratio", "ratio_reference_pool",
               "n_experts", "n_domains", "list_length"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _audit_layer(
    layer: int, experts: np.ndarray, rank: np.ndarray, value: np.ndarray, K: int, mass: float,
    presence_ratio: float, n_experts: int, ref_pool: int,
) -> dict[str, Any]:  # fmt: skip
    D = rank.shape[1]
    mu, var = rank.mean(axis=1), rank.var(axis=1)
    presence = (rank <= K).sum(axis=1)
    avg_eci = value.sum(axis=1) / D
    candidates = np.flatnonzero(presence >= ceil(presence_ratio * D - 1e-9))
    if not len(candidates) and len(experts):
        candidates = np.flatnonzero(presence == presence.max())
    members = [
        i for i in candidates
        if not any(mu[j] <= mu[i] and var[j] <= var[i] and (mu[j] < mu[i] or var[j] < var[i]) for j in candidates)
    ]  # fmt: skip
    members.sort(key=lambda i: (mu[i], var[i], experts[i]))
    coverage = float(avg_eci[members].sum() / mass) if mass > 0 else 0.0
    return {
        "layer": layer,
        "committee": [int(experts[i]) for i in members],
        "size": len(members),
        "avg_mu": float(mu[members].mean()) if members else np.nan,
        "avg_sigma_sq": float(var[members].mean()) if members else np.nan,
        "coverage": coverage,
        "ratio": _ratio(coverage, len(members), n_experts),
        "ratio_reference_pool": _ratio(coverage, len(members), ref_pool),
        "n_experts": n_experts,
        "n_domains": D,
        "list_length": K,
    }


def _ratio(coverage: float, size: int, pool: int) -> float:
    """Influence density of the committee against the rest of the pool (1.0 when undefined)."""
    if not 0 < size < pool:
        return 1.0
    if coverage >= 1 - 1e-12:  # all of the list mass (up to float noise in the sums)
        return float("inf")
    return (coverage / size) / ((1 - coverage) / (pool - size))


def committee_lists_from_long(rows: pd.DataFrame, *, agg: str = "mean", list_length: int | None = None) -> pd.DataFrame:
    """Ordered lists from the reference's long-format input (layer, domain, expert_idx, expert_weight
    [, topk_rank]): weight aggregated per (layer, domain, expert) with ``agg`` (mean over the rows where the
    expert appears, sum or median), sorted by it (ties by mean rank, full ties by the lower expert id: the
    reference's ``groupby`` sorts its keys and its sort is stable), cut to K = ``list_length``, else
    max(topk_rank) + 1, else the most distinct experts in any group, padded with expert -1 / 0.0."""
    if agg not in ("mean", "sum", "median"):
        raise InputError(f"agg must be mean, sum or median, not {agg!r}")
    has_rank = "topk_rank" in rows
    grouped = rows.groupby(["layer", "domain", "expert_idx"], sort=True).agg(
        value=("expert_weight", agg), mean_rank=("topk_rank" if has_rank else "expert_weight", "mean" if has_rank else "size")
    ).reset_index()
    if not has_rank:
        grouped["mean_rank"] = 0.0
    K = list_length or (int(rows["topk_rank"].max()) + 1 if has_rank else int(grouped.groupby(["layer", "domain"]).size().max()))
    frames = []
    for (layer, domain), g in grouped.groupby(["layer", "domain"], sort=False):
        g = g.sort_values(["value", "mean_rank"], ascending=[False, True], kind="stable").head(K)
        pad = K - len(g)
        frames.append(
            pd.DataFrame(
                {"layer": layer, "domain": domain, "rank": np.arange(1, K + 1),
                 "expert": np.r_[g["expert_idx"].to_numpy(), np.full(pad, -1)].astype(np.int64),
                 "value": np.r_[g["value"].to_numpy(), np.zeros(pad)]}
            )
        )  # fmt: skip
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["layer", "domain", "rank", "expert", "value"])


def standing_committee(
    source: Any,
    run: int | None = None,
    *,
    eci: str = "minmax",
    list_length: int | None = None,
    presence_ratio: float = 0.8,
    unit: str = "last_prompt_token",
    decimals: int | None = 4,
    phase: str | None = None,
    **how: Any,
) -> pd.DataFrame:
    """Stage I lists (`committee_lists`) audited by Stage III (`audit_committee`) with the run's true E per
    layer. Per layer: committee (expert ids, by μ), size, avg_mu, avg_sigma_sq, coverage, ratio,
    ratio_reference_pool (the reference's guessed E). Needs at least one label."""
    lists, data = _lists(source, run, eci, list_length, unit, decimals, phase, how)
    return _audited(lists, data, eci, list_length, presence_ratio, unit, decimals)


def _audited(
    lists: pd.DataFrame, data: RoutingData, eci: str, list_length: int | None, presence_ratio: float, unit: str, decimals: int | None
) -> pd.DataFrame:
    """`standing_committee`'s table from Stage I lists."""
    if lists.empty:
        raise InputError(
            f"no labelled units to profile (unit={unit!r}): the standing committee needs labelled sequences"
            + (" with prompt tokens" if unit == "last_prompt_token" else "")
        )
    df = audit_committee(lists, presence_ratio=presence_ratio, n_experts=dict(zip(data.layer_ids.tolist(), data.n_experts.tolist())))
    return result(
        df, data, "standing_committee", eci=eci, list_length=list_length, presence_ratio=presence_ratio, unit=unit,
        decimals=decimals, stage_ii="not applied (not in the shipped audit)", reference=_REFERENCE,
    )  # fmt: skip


@dataclass(frozen=True)
class ShareCounts(Chunked):
    """Per layer ``[D, E]`` routed slots and gate mass over each label's units, and ``[D]`` units."""

    unit: str = "token"

    def map(self, batch: RoutingData) -> dict[str, Any]:
        units = unit_tokens(batch, self.unit)
        label, D = batch.label[units], len(batch.label_names)
        return {
            "n_units": np.bincount(label[label >= 0], minlength=D),
            "counts": [group_expert_counts(batch.experts[li, units], int(E), label, D) for li, E in enumerate(batch.n_experts)],
            "mass": [group_expert_counts(batch.experts[li, units], int(E), label, D, weights=batch.weights[li, units]) for li, E in enumerate(batch.n_experts)],
        }  # fmt: skip

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        """``unit="token"`` (any phase filter) from ``tokens`` and ``expert_counts``; the last prompt token of
        each sequence is in no summary: None (streamed)."""
        from moelens.analysis.summary_partials import label_tables

        tables = label_tables(store, ctx, "count", "gate_mass") if self.unit == "token" else None
        if tables is None:
            return None
        n, (counts, mass) = tables
        D = len(ctx.meta.label_names)
        return {"n_units": n[:D], "counts": [a[:D] for a in counts], "mass": [a[:D] for a in mass]}


#: `standing_committee`'s parameters and defaults (the committee `committee_share` computes when given none).
_COMMITTEE_DEFAULTS: dict[str, Any] = {"eci": "minmax", "list_length": None, "presence_ratio": 0.8, "unit": "last_prompt_token", "decimals": 4}


def committee_share(
    source: Any,
    run: int | None = None,
    *,
    committee: pd.DataFrame | Mapping[int, Any] | None = None,
    unit: str = "token",
    phase: str | None = None,
    **committee_params: Any,
) -> pd.DataFrame:
    """Per (layer, label): the committee's ``count_share`` of routed slots and ``mass_share`` of gate mass
    over the label's units (all tokens by default). ``committee`` is a `standing_committee` result or
    {layer: [experts]}; by default it is computed with ``committee_params`` (a second pass). [moelens]
    (the paper's "captures the majority of routing mass" is relative to the top-K lists only)."""
    how = {k: committee_params.pop(k) for k in list(committee_params) if k in HOW_OPTIONS}
    if committee is None:  # the committee's Stage I statistics and the shares from one pass
        params = {**_COMMITTEE_DEFAULTS, **committee_params}
        if unknown := set(params) - set(_COMMITTEE_DEFAULTS):
            raise InputError(f"committee_share: unknown committee parameters {sorted(unknown)}; known: {sorted(_COMMITTEE_DEFAULTS)}")
        _check(params["eci"], params["unit"])
        (stats, partial), ctx = compute_partial(Fused((EciStats(params["unit"]), ShareCounts(unit))), source, run, phase=phase, **how)
        lists = _lists_table(stats, ctx.meta, params["eci"], params["list_length"], params["decimals"])
        committee = _audited(lists, ctx.meta, **params)
    else:
        partial, ctx = compute_partial(ShareCounts(unit), source, run, phase=phase, **how)
    members = dict(zip(committee["layer"], committee["committee"])) if isinstance(committee, pd.DataFrame) else dict(committee)
    data = ctx.meta
    D = len(data.label_names)
    frames = []
    for li, layer in enumerate(data.layer_ids):
        E = int(data.n_experts[li])
        chosen = np.zeros(E, bool)
        chosen[list(members.get(int(layer), []))] = True
        counts, mass = partial["counts"][li], partial["mass"][li]
        with np.errstate(invalid="ignore", divide="ignore"):
            frames.append(
                pd.DataFrame(
                    {"layer": int(layer), "label": list(data.label_names), "committee": [sorted(members.get(int(layer), []))] * D,
                     "n_units": partial["n_units"], "count_share": counts[:, chosen].sum(axis=1) / counts.sum(axis=1),
                     "mass_share": mass[:, chosen].sum(axis=1) / mass.sum(axis=1)}
                )
            )  # fmt: skip
    columns = ["layer", "label", "committee", "n_units", "count_share", "mass_share"]
    df = pd.concat(frames) if frames else pd.DataFrame(columns=columns)
    return result(df, data, "committee_share", unit=unit, reference="[moelens] over " + _REFERENCE)
