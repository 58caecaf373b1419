"""Router internals: how sure the router is per layer (entropy, top-1/top-2 margin, near-ties)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from moelens.viz._base import empty_figure, finish_figure
from moelens.viz._frames import layer_label


def router_confidence_chart(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Per layer (``router_stats`` output: ``layer, n_tokens, norm_entropy, margin, near_tie_share``): bars for
    the mean normalised entropy, the mean top-1/top-2 probability margin and the share of near-ties."""
    name = "router_confidence_chart"
    ttl = title or "How sure the router is, per layer"
    if df is None or df.empty:
        return empty_figure(name, ttl, "No router logits recorded.")
    d = df.sort_values("layer")
    x = [layer_label(v) for v in d["layer"]]
    fig = go.Figure()
    for col, label, color in (("norm_entropy", "entropy / ln E", "#4e79a7"), ("margin", "top-1 − top-2 probability", "#59a14f"),
                              ("near_tie_share", "near-ties", "#e15759")):
        fig.add_trace(go.Bar(x=x, y=d[col] * 100, name=label, marker_color=color,
                             hovertemplate=f"layer %{{x}}<br>{label} %{{y:.1f}}%<extra></extra>"))
    worst = d.loc[d["near_tie_share"].idxmax()]
    sure = d.loc[d["margin"].idxmax()]
    tie = d.attrs.get("params", {}).get("near_tie", df.attrs.get("params", {}).get("near_tie"))
    finding = (f"Most near-ties in layer {layer_label(worst['layer'])}: {worst['near_tie_share'] * 100:.1f}% of tokens have "
               f"a top-1/top-2 margin below {tie if tie is not None else 'the threshold'}; the router is surest in layer "
               f"{layer_label(sure['layer'])} (mean margin {sure['margin']:.2f}); n = {int(d['n_tokens'].max()):,} tokens per layer.")
    fig.update_xaxes(type="category")
    fig.update_yaxes(range=[0, 105])
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.2))
    return finish_figure(fig, name, ttl, finding, x_title="layer", y_title="%", height=380)
