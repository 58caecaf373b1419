"""Experts associated with a token set, regex or label (nPMI, risk difference), ranked."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from moelens.viz import findings as F
from moelens.viz._base import empty_figure, finish_figure, interval
from moelens.viz._frames import expert_label, layer_label, pick
from moelens.viz.palette import expert_color


def ranked_experts_bar(
    df: pd.DataFrame,
    *,
    value: str | None = None,
    n: int = 20,
    title: str | None = None,
    what: str = "the selection",
    name: str = "npmi_bar",
) -> go.Figure:
    """Top ``n`` (layer, expert) pairs by a score, as horizontal bars in the experts' colours
    (``npmi`` / ``npmi_combined`` / ``risk_difference`` output: ``layer, expert, <value>``)."""
    ttl = title or f"Experts most associated with {what}"
    if df is None or df.empty:
        return empty_figure(name, ttl, f"No tokens match {what}.")
    v = value or pick(df, ["npmi", "score", "risk_diff", "value"], "score")
    d = df.dropna(subset=[v])
    d = d[d["expert"] >= 0]
    top = d.reindex(d[v].abs().sort_values(ascending=False).index).head(n) if v == "risk_diff" else d.nlargest(n, v)
    top = top.iloc[::-1]
    ylab = [f"{layer_label(lv)} · {expert_label(ev)}" for lv, ev in zip(top["layer"], top["expert"])]
    fig = go.Figure(
        go.Bar(
            x=top[v],
            y=ylab,
            error_x=interval(top, v),
            orientation="h",
            marker_color=[expert_color(int(e), int(lv)) for lv, e in zip(top["layer"], top["expert"])],
            name=v,
            hovertemplate=f"%{{y}}<br>{v} %{{x:.3f}}<extra></extra>",
        )
    )
    fig.update_yaxes(type="category")
    if v == "npmi":
        fig.update_xaxes(range=[min(-0.05, float(top[v].min()) - 0.05), 1.0])
    return finish_figure(
        fig,
        name,
        ttl,
        F.npmi_finding(d, value=v, what=what),
        x_title=v,
        y_title="layer · expert",
        height=max(300, 110 + 22 * len(top)),
    )


def npmi_bar(df: pd.DataFrame, *, n: int = 20, what: str = "the selection", title: str | None = None) -> go.Figure:
    """Experts ranked by nPMI with a token set / regex / label (``npmi`` output: ``layer, expert, npmi``)."""
    return ranked_experts_bar(df, value=pick(df, ["npmi", "score"], "nPMI") if df is not None and len(df) else None, n=n, title=title, what=what)
