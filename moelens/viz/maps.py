"""Maps: the (layer, expert) units placed in two dimensions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moelens.viz import findings as F
from moelens.viz._base import empty_figure, finish_figure, sorted_layers
from moelens.viz._frames import expert_label, layer_label, pick
from moelens.viz.palette import expert_color, label_color


def expert_map_scatter(
    df: pd.DataFrame,
    *,
    color_by: str = "layer",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """2-D map of (layer, expert) points (``expert_map`` output: ``layer, expert, x, y`` [, ``dominant_label``,
    ``share``]) coloured by ``layer``, ``dominant_label`` or ``expert``."""
    name = "expert_map"
    ttl = title or "Expert map"
    if df is None or df.empty:
        return empty_figure(name, ttl, "No experts to place.")
    xc = pick(df, ["x", "umap_x", "x0"], "x coordinate")
    yc = pick(df, ["y", "umap_y", "x1"], "y coordinate")
    fig = go.Figure()
    extra_cols = [c for c in ("dominant_label", "label_share", "share", "load") if c in df.columns]

    def hover(dd: pd.DataFrame) -> tuple[np.ndarray, str]:
        cd = np.column_stack([dd["layer"].map(layer_label), dd["expert"].map(expert_label)] + [dd[c].astype(str) for c in extra_cols])
        extra = "".join(f"<br>{c} %{{customdata[{i + 2}]}}" for i, c in enumerate(extra_cols))
        return cd, "%{customdata[0]} · %{customdata[1]}" + extra + "<extra></extra>"

    if color_by == "layer":
        import plotly.colors as pc

        layers = sorted_layers(df["layer"])
        cols = pc.sample_colorscale("Viridis", [i / max(1, len(layers) - 1) for i in range(len(layers))])
        for lv, c in zip(layers, cols):
            dd = df[df["layer"] == lv]
            cd, ht = hover(dd)
            fig.add_trace(go.Scatter(x=dd[xc], y=dd[yc], mode="markers", name=layer_label(lv), marker=dict(color=c, size=9), customdata=cd, hovertemplate=ht))
    elif color_by == "expert":
        for e in sorted(df["expert"].unique()):
            dd = df[df["expert"] == e]
            cd, ht = hover(dd)
            fig.add_trace(go.Scatter(x=dd[xc], y=dd[yc], mode="markers", name=expert_label(e), marker=dict(color=expert_color(int(e)), size=9), customdata=cd, hovertemplate=ht))
    else:
        col = color_by if color_by in df.columns else pick(df, ["dominant_label", "label"], "label")
        all_labels = list(labels) if labels is not None else [str(v) for v in df[col].dropna().unique()]
        for lab in sorted(df[col].fillna("(none)").astype(str).unique()):
            dd = df[df[col].fillna("(none)").astype(str) == lab]
            cd, ht = hover(dd)
            fig.add_trace(go.Scatter(x=dd[xc], y=dd[yc], mode="markers", name=lab, marker=dict(color=label_color(lab if lab != "(none)" else None, all_labels), size=9), customdata=cd, hovertemplate=ht))
    fig.update_xaxes(showticklabels=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, zeroline=False, scaleanchor="x", scaleratio=1)
    return finish_figure(
        fig,
        name,
        ttl,
        F.map_finding(df, color=color_by if color_by in df.columns else None),
        x_title="map x",
        y_title="map y",
        height=520,
    )


def token_map_scatter(df: pd.DataFrame, *, color_by: str = "label", labels: Sequence[str] | None = None,
                      title: str | None = None) -> go.Figure:
    """2-D map of sampled tokens by their router logits (``token_map`` output: ``token, label, top1, x, y``),
    coloured by ``label`` or by the recorded first choice ``top1``."""
    name = "token_map"
    ttl = title or "Token map (router logits)"
    if df is None or df.empty:
        return empty_figure(name, ttl, "No tokens to place.")
    fig = go.Figure()
    layer = df.attrs.get("params", {}).get("layer")
    groups = "top1" if color_by == "top1" else "label"
    keys = df[groups].map(expert_label) if groups == "top1" else df["label"].fillna("(none)").astype(str)
    all_labels = list(labels) if labels is not None else sorted(keys.unique())
    for key in sorted(keys.unique(), key=lambda k: (len(k), k)):
        dd = df[keys == key]
        color = (expert_color(int(dd["top1"].iloc[0]), layer) if groups == "top1"
                 else label_color(key if key != "(none)" else None, all_labels))
        fig.add_trace(go.Scattergl(
            x=dd["x"], y=dd["y"], mode="markers", name=key, marker=dict(color=color, size=5, opacity=0.75),
            customdata=np.column_stack([dd["token"].astype(str).map(lambda t: repr(t)[1:-1]), dd["seq_id"], dd["pos"]]),
            hovertemplate="‘%{customdata[0]}’ · seq %{customdata[1]} pos %{customdata[2]}<extra>" + key + "</extra>",
        ))  # fmt: skip
    fig.update_xaxes(showticklabels=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, zeroline=False, scaleanchor="x", scaleratio=1)
    finding = (f"{len(df):,} sampled tokens placed by their router logits"
               + (f" at layer {layer_label(layer)}" if layer is not None else "")
               + f", coloured by {'first choice' if groups == 'top1' else 'label'}: tokens the router treats alike sit together.")
    return finish_figure(fig, name, ttl, finding, x_title="map x", y_title="map y", height=520)
