"""Steering: the dose–response of an intervention against random controls of the same shape."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from moelens.viz._base import empty_figure, finish_figure
from moelens.viz.palette import label_color, rgba


def dose_response_chart(df: pd.DataFrame, *, what: str = "boost offset", title: str | None = None) -> go.Figure:
    """Loss change per label over a grid of strengths (``dose_response`` output: ``value, label, delta_loss,
    random_mean, random_std`` [, ``z, p_perm, n_random``]): a solid line for the chosen experts, a dashed line
    and a ±1 std band for the random controls of the same label."""
    name = "dose_response_chart"
    ttl = title or f"Dose–response: loss change against {what}"
    if df is None or df.empty:
        return empty_figure(name, ttl, "No dose–response measured yet.")
    d = df.assign(label=df["label"].fillna("(no label)").astype(str)).sort_values("value")
    labels = sorted(d["label"].unique())
    fig = go.Figure()
    for lab in labels:
        g = d[d["label"] == lab]
        color = label_color(lab, labels)
        lo, hi = g["random_mean"] - g["random_std"].fillna(0), g["random_mean"] + g["random_std"].fillna(0)
        fig.add_trace(go.Scatter(x=list(g["value"]) + list(g["value"])[::-1], y=list(hi) + list(lo)[::-1],
                                 fill="toself", fillcolor=rgba(color, 0.15), line=dict(width=0), hoverinfo="skip",
                                 showlegend=False, legendgroup=lab))
        fig.add_trace(go.Scatter(x=g["value"], y=g["random_mean"], mode="lines", name=f"{lab} · random controls",
                                 line=dict(color=color, dash="dash"), legendgroup=lab,
                                 hovertemplate=f"{lab} · random<br>{what} %{{x}}<br>Δ loss %{{y:.3f}}<extra></extra>"))
        fig.add_trace(go.Scatter(x=g["value"], y=g["delta_loss"], mode="lines+markers", name=f"{lab} · chosen experts",
                                 line=dict(color=color), legendgroup=lab,
                                 hovertemplate=f"{lab}<br>{what} %{{x}}<br>Δ loss %{{y:.3f}}<extra></extra>"))
    top = d.loc[(d["delta_loss"] - d["random_mean"]).abs().idxmax()]
    n_random = int(d["n_random"].max()) if "n_random" in d.columns else None
    finding = (f"Largest effect beyond the random controls: {top['label']} at {what} {top['value']:g}, Δ loss "
               f"{top['delta_loss']:+.3f} vs {top['random_mean']:+.3f} for random experts"
               + (f" (z = {top['z']:.1f}, permutation p = {top['p_perm']:.2f})" if "p_perm" in d.columns and pd.notna(top.get("p_perm")) else "")
               + (f"; n = {n_random} random controls per point." if n_random is not None else "."))
    fig.add_hline(y=0, line_color="#bbb")
    fig.update_layout(legend=dict(orientation="h", y=-0.25))
    return finish_figure(fig, name, ttl, finding, x_title=what, y_title="Δ loss (nats/token)", height=420)
