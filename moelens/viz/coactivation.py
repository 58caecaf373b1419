"""Co-activation and cross-layer transitions: which experts are picked together, and what follows what."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moelens.viz import findings as F
from moelens.viz._base import empty_figure, finish_figure
from moelens.viz._frames import expert_label, layer_label, pick
from moelens.viz.palette import DIVERGING_SCALE, SEQUENTIAL_SCALE


def coactivation_heatmap(
    df: pd.DataFrame,
    *,
    layer: int | None = None,
    value: str | None = None,
    baseline: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Expert × expert co-activation at one layer (``coactivation`` output: ``layer, expert_i, expert_j, <value>``;
    default value ``p_j_given_i`` = P(j picked | i picked), rows i, columns j)."""
    name = "coactivation_heatmap"
    if df is None or df.empty:
        return empty_figure(name, title or "Co-activation", "No co-activated pairs (k = 1 routes one expert per token).")
    v = value or pick(df, ["p_j_given_i", "conditional", "coactivation", "jaccard", "npmi", "value"], "co-activation")
    a = pick(df, ["expert_i", "expert_a", "i"], "first expert")
    b = pick(df, ["expert_j", "expert_b", "j"], "second expert")
    if "layer" in df.columns:
        if layer is None:
            layer = int(df["layer"].min())
        d = df[df["layer"] == layer]
    else:
        d = df
    ttl = title or f"Co-activation · layer {layer_label(layer) if layer is not None else ''}".rstrip(" ·")
    if d.empty:
        return empty_figure(name, ttl, "No co-activated pairs in this layer.")
    E = int(max(d[a].max(), d[b].max())) + 1
    grid = d.pivot_table(index=a, columns=b, values=v, aggfunc="sum").reindex(index=range(E), columns=range(E))
    z = np.array(grid.to_numpy(dtype=float), copy=True)
    np.fill_diagonal(z, np.nan)
    signed = v == "npmi" or (np.nanmin(z) < 0 if np.isfinite(z).any() else False)
    scale = 1.0 if signed else 100.0
    labels = [expert_label(e) for e in range(E)]
    fig = go.Figure(
        go.Heatmap(
            z=z * scale,
            x=labels,
            y=labels,
            colorscale=DIVERGING_SCALE if signed else SEQUENTIAL_SCALE,
            zmid=0 if signed else None,
            zmin=None if signed else 0,
            colorbar=dict(title=dict(text=v if signed else "% of row's tokens", side="right")),
            hovertemplate=(
                "when %{y} is picked, %{x} is picked too<br>%{z:.1f}% of the time<extra></extra>"
                if not signed
                else f"%{{y}} & %{{x}}<br>{v} %{{z:.3f}}<extra></extra>"
            ),
            hoverongaps=False,
            name=v,
        )
    )
    fig.update_xaxes(type="category", title_text="co-picked expert j", nticks=min(E, 32))
    fig.update_yaxes(type="category", autorange="reversed", title_text="expert i", nticks=min(E, 32))
    return finish_figure(fig, name, ttl, F.coactivation_finding(d, value=v, baseline=baseline), height=min(900, max(360, 140 + 22 * E)))  # 256 experts: a square, not a scroll


def transition_heatmap(df: pd.DataFrame, *, layer: int | None = None, value: str | None = None, title: str | None = None) -> go.Figure:
    """Top-1 expert at one layer → top-1 expert at the next (``cross_layer_transitions`` output:
    ``layer, next_layer, expert, next_expert, <value>``)."""
    name = "transition_heatmap"
    if df is None or df.empty:
        return empty_figure(name, title or "Cross-layer transitions", "No cross-layer transitions.")
    v = value or pick(df, ["p", "p_next_given_expert", "probability", "prob", "share", "count"], "transition value")
    src = pick(df, ["expert", "expert_from", "from_expert"], "source expert")
    dst = pick(df, ["next_expert", "expert_to", "to_expert"], "target expert")
    lay = pick(df, ["layer", "layer_from", "from_layer"], "layer")
    nxt = pick(df, ["next_layer", "layer_to", "to_layer"], "next layer", required=False)
    layer = int(df[lay].min()) if layer is None else layer
    d = df[df[lay] == layer]
    nl = int(d[nxt].iloc[0]) if nxt and len(d) else None
    ttl = title or f"Top-1 expert: layer {layer_label(layer)} → {layer_label(nl) if nl is not None else 'next'}"
    if d.empty:
        return empty_figure(name, ttl, "No transitions from this layer.")
    Ea = int(d[src].max()) + 1
    Eb = int(d[dst].max()) + 1
    grid = d.pivot_table(index=src, columns=dst, values=v, aggfunc="sum").reindex(index=range(Ea), columns=range(Eb))
    z = grid.to_numpy(dtype=float)
    is_share = v != "count"
    fig = go.Figure(
        go.Heatmap(
            z=z * (100 if is_share else 1),
            x=[expert_label(e) for e in range(Eb)],
            y=[expert_label(e) for e in range(Ea)],
            colorscale=SEQUENTIAL_SCALE,
            zmin=0,
            colorbar=dict(title=dict(text="%" if is_share else "tokens", side="right")),
            hovertemplate="%{y} → %{x}<br>%{z:.1f}" + ("%" if is_share else " tokens") + "<extra></extra>",
            hoverongaps=False,
        )
    )
    finding = ""
    dd = d.dropna(subset=[v])
    if len(dd):
        r = dd.loc[dd[v].idxmax()]
        finding = (
            f"Strongest path: {expert_label(r[src])} in {layer_label(layer)} → {expert_label(r[dst])} in "
            f"{layer_label(nl) if nl is not None else 'the next layer'} ({r[v] * 100:.1f}%)." if is_share else
            f"Strongest path: {expert_label(r[src])} → {expert_label(r[dst])} ({int(r[v])} tokens)."
        )
    fig.update_xaxes(type="category", title_text=f"top-1 expert in {layer_label(nl) if nl is not None else 'next layer'}")
    fig.update_yaxes(type="category", autorange="reversed", title_text=f"top-1 expert in {layer_label(layer)}")
    return finish_figure(fig, name, ttl, finding, height=min(900, max(360, 140 + 22 * Ea)))
