"""Standing committees: the small set of experts that carry most of the routing mass of every label."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moelens.viz import findings as F
from moelens.viz._base import empty_figure, finish_figure
from moelens.viz._frames import expert_label, layer_label, pick


def _members(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, str):
        return v
    try:
        return ", ".join(expert_label(e) for e in list(v))
    except TypeError:
        return str(v)


def committee_chart(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Standing committee per layer (``standing_committee`` output: ``layer, committee, size, coverage``
    [, ``ratio, avg_mu, avg_sigma_sq``]): bars = coverage, text = members."""
    name = "committee_chart"
    ttl = title or "Standing committee per layer"
    if df is None or df.empty:
        return empty_figure(name, ttl, "No standing committee found (needs at least two labels).")
    lay = pick(df, ["layer", "Layer"], "layer")
    cov = pick(df, ["coverage", "Coverage"], "coverage")
    mem = pick(df, ["committee", "Committee", "members"], "committee", required=False)
    size = pick(df, ["size", "Size", "committee_size"], "size", required=False)
    ratio = pick(df, ["ratio", "Ratio"], "ratio", required=False)
    d = df.sort_values(lay)
    members = [_members(v) for v in d[mem]] if mem else [""] * len(d)
    custom = np.column_stack(
        [
            members,
            d[size].astype(str).to_numpy() if size else [""] * len(d),
            [f"{v:.2f}" if pd.notna(v) else "" for v in d[ratio]] if ratio else [""] * len(d),
        ]
    )
    fig = go.Figure(
        go.Bar(
            x=[layer_label(v) for v in d[lay]],
            y=d[cov] * 100,
            text=members,
            textposition="auto",
            marker_color="#59a14f",
            customdata=custom,
            name="coverage",
            hovertemplate="layer %{x}<br>committee: %{customdata[0]}<br>size %{customdata[1]}"
            "<br>coverage %{y:.1f}% of top-K mass<br>influence ratio %{customdata[2]}<extra></extra>",
        )
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(range=[0, 105])
    return finish_figure(
        fig,
        name,
        ttl,
        F.committee_finding(d.rename(columns={lay: "layer"}) if lay != "layer" else d),
        x_title="layer",
        y_title="coverage (% of top-K mass)",
        height=380,
    )
