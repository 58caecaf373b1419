"""Load and balance: how tokens spread over the experts of each layer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moelens.viz import findings as F
from moelens.viz._base import empty_figure, one_label, finish_figure, sorted_layers
from moelens.viz._frames import expert_label, layer_label, pick
from moelens.viz.findings import _n_experts  # one count of E, so a chart and its finding agree
from moelens.viz.palette import SEQUENTIAL_SCALE


def load_heatmap(
    df: pd.DataFrame,
    value: str = "share",
    *,
    label: str | None = None,
    n_experts: int | None = None,
    zmax: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layer × expert heatmap of load (``expert_load`` output: ``layer, expert, <value>`` [, ``label``]).

    ``value`` is ``share`` (binary top-k: fraction of routed slots) or ``gate_share`` (gate-weighted).
    Capacity drops (expert -1) are left out of the grid. ``zmax`` (in %) fixes the top of the colour scale, so
    heatmaps that are compared side by side share one scale.
    """
    weighted = "gate" in value
    name = "load_heatmap"
    ttl = title or ("Gate-weighted load" if weighted else "Expert load (top-k slots)") + (f" · {label}" if label else "")
    if df is None or df.empty:
        return empty_figure(name, ttl, "No routed tokens in this selection.")
    d = one_label(df, label)
    if value not in d.columns:
        raise ValueError(f"no column {value!r} in expert_load output (columns: {list(d.columns)})")
    d = d[d["expert"] >= 0]
    E = _n_experts(d, "expert", n_experts)
    layers = sorted_layers(d["layer"])
    grid = d.pivot_table(index="layer", columns="expert", values=value, aggfunc="sum", dropna=False)
    grid = grid.reindex(index=layers, columns=range(E))
    z = grid.to_numpy(dtype=float) * 100.0
    show_text = E <= 16 and len(layers) <= 24
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[expert_label(e) for e in range(E)],
            y=[layer_label(v) for v in layers],
            colorscale=SEQUENTIAL_SCALE,
            zmin=0,
            zmax=zmax,
            colorbar=dict(title=dict(text="% of gate mass" if weighted else "% of slots", side="right")),
            text=np.where(np.isnan(z), "", np.vectorize(lambda v: f"{v:.0f}")(np.nan_to_num(z))) if show_text else None,
            texttemplate="%{text}" if show_text else None,
            hovertemplate="layer %{y} · expert %{x}<br>"
            + ("gate share" if weighted else "load share")
            + " %{z:.2f}%<extra></extra>",
            hoverongaps=False,
            name=value,
        )
    )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", side="bottom", nticks=min(E, 32))  # 64-256 experts: every n-th label
    return finish_figure(
        fig,
        name,
        ttl,
        F.load_finding(d, value=value, n_experts=E),
        x_title="expert",
        y_title="layer",
        height=max(320, 140 + 40 * len(layers)),
    )


def entropy_chart(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Normalised load entropy per layer (``layer_balance`` output: ``layer, norm_entropy`` and optionally
    ``effective_experts, imbalance, dead_experts, n_experts``), with the even-spread line at 1."""
    name = "entropy_chart"
    ttl = title or "Load balance per layer"
    if df is None or df.empty:
        return empty_figure(name, ttl, "No layers to show.")
    h = pick(df, ["norm_entropy", "normalized_entropy", "entropy_norm", "load_entropy_norm"], "normalised entropy")
    dead = pick(df, ["dead_experts", "n_dead", "dead"], "dead experts", required=False)
    eff = pick(df, ["effective_experts", "effective_n", "perplexity"], "effective experts", required=False)
    imb = pick(df, ["imbalance", "max_mean", "max_over_mean"], "imbalance", required=False)
    d = df.sort_values("layer")
    x = [layer_label(v) for v in d["layer"]]
    custom = np.column_stack(
        [
            d[eff].to_numpy(dtype=float) if eff else np.full(len(d), np.nan),
            d[imb].to_numpy(dtype=float) if imb else np.full(len(d), np.nan),
            d[dead].to_numpy(dtype=float) if dead else np.full(len(d), np.nan),
        ]
    )
    text = None
    if dead:
        text = [f"{int(v)} dead" if pd.notna(v) and v > 0 else "" for v in d[dead]]
    fig = go.Figure(
        go.Bar(
            x=x,
            y=d[h],
            name="normalised entropy",
            marker_color="#4e79a7",
            text=text,
            textposition="outside",
            customdata=custom,
            hovertemplate="layer %{x}<br>normalised entropy %{y:.3f}<br>effective experts %{customdata[0]:.1f}"
            "<br>max/mean load %{customdata[1]:.2f}<br>dead experts %{customdata[2]:.0f}<extra></extra>",
        )
    )
    fig.add_hline(y=1.0, line_dash="dash", line_color="#888", annotation_text="even spread", annotation_position="top left")
    fig.update_yaxes(range=[0, 1.12])
    fig.update_xaxes(type="category")
    return finish_figure(fig, name, ttl, F.balance_finding(d), x_title="layer", y_title="load entropy / ln E", height=340)
