"""Comparison of two runs: routing agreement per layer."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from moelens.viz import findings as F
from moelens.viz._base import empty_figure, finish_figure
from moelens.viz._frames import layer_label, pick


def agreement_chart(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Run-vs-run routing agreement per layer (``run_agreement`` output: ``layer, n_tokens, top1_agreement,
    topk_overlap, k, baseline``): bars for the top-k overlap and the same-first-choice rate, each with its
    uniform-routing chance level: k/E for the overlap, 1/E for the first choice."""
    name = "agreement_chart"
    ttl = title or "Routing agreement between the two runs"
    if df is None or df.empty:
        return empty_figure(name, ttl, "The two runs share no aligned tokens.")
    tk = pick(df, ["topk_overlap", "topk_agreement", "agreement", "overlap"], "top-k overlap")
    t1 = pick(df, ["top1_agreement", "first_agreement"], "top-1 agreement", required=False)
    base = pick(df, ["baseline", "uniform", "chance"], "baseline", required=False)
    d = df.sort_values("layer")
    x = [layer_label(v) for v in d["layer"]]
    fig = go.Figure(
        go.Bar(x=x, y=d[tk] * 100, name="top-k overlap", marker_color="#4e79a7", hovertemplate="layer %{x}<br>top-k overlap %{y:.1f}%<extra></extra>")
    )
    if t1:
        fig.add_trace(go.Bar(x=x, y=d[t1] * 100, name="same top-1", marker_color="#f28e2b", hovertemplate="layer %{x}<br>same top-1 %{y:.1f}%<extra></extra>"))
    if base:
        fig.add_trace(go.Scatter(x=x, y=d[base] * 100, mode="lines", name="chance, top-k overlap (k/E)", line=dict(dash="dash", color="#4e79a7"), hovertemplate="layer %{x}<br>chance %{y:.1f}%<extra></extra>"))
        if t1 and "k" in d.columns:  # two independent uniform first choices agree with probability 1/E = (k/E) / k
            fig.add_trace(go.Scatter(x=x, y=d[base] / d["k"] * 100, mode="lines", name="chance, same top-1 (1/E)", line=dict(dash="dot", color="#f28e2b"), hovertemplate="layer %{x}<br>chance %{y:.1f}%<extra></extra>"))
    fig.update_xaxes(type="category")
    fig.update_yaxes(range=[0, 105])
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.2))
    return finish_figure(fig, name, ttl, F.agreement_finding(d, value=tk), x_title="layer", y_title="% of aligned tokens", height=380)
