"""Specialization: how routing depends on the sequence label and on the token vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go

from moelens.viz import findings as F
from moelens.viz._base import empty_figure, finish_figure, sorted_layers
from moelens.viz._frames import expert_label, layer_label, pick
from moelens.viz.findings import _n_experts  # one count of E, so a chart and its finding agree
from moelens.viz.palette import SEQUENTIAL_SCALE, expert_color


def specialization_heatmap(
    df: pd.DataFrame,
    *,
    layer: int | None = None,
    value: str | None = None,
    baseline: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Label × expert heatmap at one layer (``domain_specialization`` output: ``layer, expert, label, <value>``).

    ``value`` defaults to ``specialization`` (fraction of the label's tokens that have the expert in their
    top-k). ``layer`` defaults to the layer holding the most specialised expert.
    """
    name = "specialization_heatmap"
    if df is None or df.empty:
        return empty_figure(name, title or "Domain specialization", "No labelled tokens: label sequences to see specialization.")
    v = value or pick(df, ["specialization", "spec", "share"], "specialization")
    d = df.dropna(subset=[v])
    d = d[d["expert"] >= 0]
    if layer is None:
        layer = int(d.loc[d[v].idxmax(), "layer"]) if len(d) else int(df["layer"].min())
    d = d[d["layer"] == layer]
    ttl = title or f"Domain specialization · layer {layer_label(layer)}"
    if d.empty:
        return empty_figure(name, ttl, f"No labelled tokens in layer {layer_label(layer)}.")
    E = _n_experts(d, "expert", None)
    labels = sorted(d["label"].astype(str).unique())
    grid = d.assign(label=d["label"].astype(str)).pivot_table(index="label", columns="expert", values=v, aggfunc="sum")
    grid = grid.reindex(index=labels, columns=range(E))
    z = grid.to_numpy(dtype=float) * 100
    if baseline is None and "baseline" in d.columns and d["baseline"].notna().any():
        baseline = float(d["baseline"].dropna().iloc[0])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[expert_label(e) for e in range(E)],
            y=labels,
            colorscale=SEQUENTIAL_SCALE,
            zmin=0,
            colorbar=dict(title=dict(text="% of label's tokens", side="right")),
            hovertemplate="label %{y} · expert %{x}<br>%{z:.1f}% of the label's tokens<extra></extra>",
            hoverongaps=False,
            name=v,
        )
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return finish_figure(
        fig,
        name,
        ttl,
        F.specialization_finding(d, value=v, baseline=baseline),
        x_title="expert",
        y_title="label",
        height=max(320, 160 + 40 * len(labels)),
    )


#: ``domain_summary`` scores drawn as lines (with their chance level as a dashed line where there is one).
DOMAIN_SCORES: dict[str, tuple[str, str | None]] = {
    "mi_ratio": ("MI(label; top-1) / H(label)", None),
    "js_bits": ("mean JS divergence between labels (bits)", None),
    "purity": ("mean expert purity", "chance_purity"),
}


def domain_summary_chart(df: pd.DataFrame, *, columns: Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """Per-layer scores of how much routing depends on the label (``domain_summary`` output: ``layer,
    mi_ratio, js_bits, purity, chance_purity`` …): one line per score, chance levels dashed."""
    name = "domain_summary_chart"
    ttl = title or "How much routing depends on the label, per layer"
    if df is None or df.empty:
        return empty_figure(name, ttl, "No labelled tokens.")
    cols = list(columns) if columns else [c for c in DOMAIN_SCORES if c in df.columns]
    if not cols:
        skip = {"layer", "n_tokens", "n_labels", "n_experts", "top_k"}
        cols = [c for c in df.columns if c not in skip and pd.api.types.is_float_dtype(df[c])]
    d = df.sort_values("layer")
    x = [layer_label(v) for v in d["layer"]]
    palette = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1"]
    fig = go.Figure()
    for i, c in enumerate(cols):
        label, chance = DOMAIN_SCORES.get(c, (c, None))
        color = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=x, y=d[c], mode="lines+markers", name=label, line=dict(color=color),
                                 hovertemplate=f"layer %{{x}}<br>{label} %{{y:.3f}}<extra></extra>"))
        if chance and chance in d.columns:
            fig.add_trace(go.Scatter(x=x, y=d[chance], mode="lines", name=f"chance ({label})",
                                     line=dict(color=color, dash="dash", width=1),
                                     hovertemplate=f"layer %{{x}}<br>chance %{{y:.3f}}<extra></extra>"))
    finding = ""
    c0 = cols[0] if cols else None
    dd = d.dropna(subset=[c0]) if c0 else d.iloc[0:0]
    if len(dd):
        r = dd.loc[dd[c0].idxmax()]
        label = DOMAIN_SCORES.get(c0, (c0, None))[0]
        finding = f"Routing depends most on the label in layer {layer_label(r['layer'])}: {label} = {r[c0]:.2f}"
        if "purity" in dd.columns and "chance_purity" in dd.columns and pd.notna(r.get("purity")):
            finding += f", expert purity {r['purity']:.2f} vs chance {r['chance_purity']:.2f}"
        finding += " (0 = routing ignores the label)."
    fig.update_xaxes(type="category")
    fig.update_layout(legend=dict(orientation="h", y=-0.2))
    return finish_figure(fig, name, ttl, finding, x_title="layer", y_title="score", height=380)


def layer_score_chart(
    df: pd.DataFrame,
    value: str,
    *,
    title: str,
    what: str,
    baseline: float | str | None = None,
    name: str = "layer_score_chart",
    percent: bool = False,
) -> go.Figure:
    """One bar per layer of a per-layer score (e.g. ``vocabulary_specialization``'s ``score``), with an
    optional baseline (a number, or a column holding one per layer) drawn as a dashed line."""
    if df is None or df.empty or value not in df.columns:
        return empty_figure(name, title, f"No data for {what}.")
    d = df.sort_values("layer")
    x = [layer_label(v) for v in d["layer"]]
    scale = 100.0 if percent else 1.0
    fig = go.Figure(go.Bar(x=x, y=d[value] * scale, name=what, marker_color="#4e79a7",
                           hovertemplate=f"layer %{{x}}<br>{what} %{{y:.3f}}<extra></extra>"))
    base_text = ""
    if isinstance(baseline, str) and baseline in d.columns:
        fig.add_trace(go.Scatter(x=x, y=d[baseline] * scale, mode="lines", name="baseline",
                                 line=dict(dash="dash", color="#888")))
    elif isinstance(baseline, (int, float)):
        fig.add_hline(y=float(baseline) * scale, line_dash="dash", line_color="#888", annotation_text="baseline")
        base_text = f"; baseline {baseline * scale:.2f}"
    dd = d.dropna(subset=[value])
    finding = ""
    if len(dd):
        r = dd.loc[dd[value].idxmax()]
        finding = f"Highest {what}: layer {layer_label(r['layer'])} with {r[value] * scale:.2f}{base_text}."
    fig.update_xaxes(type="category")
    return finish_figure(fig, name, title, finding, x_title="layer", y_title=what, height=340)


def layer_expert_heatmap(
    df: pd.DataFrame,
    value: str,
    *,
    title: str,
    what: str,
    percent: bool = False,
    name: str = "layer_expert_heatmap",
    n_experts: int | None = None,
) -> go.Figure:
    """Layer × expert heatmap of any per-(layer, expert) score (e.g. ``vocabulary_by_expert``'s ``score``)."""
    if df is None or df.empty or value not in df.columns:
        return empty_figure(name, title, f"No data for {what}.")
    d = df[df["expert"] >= 0]
    E = _n_experts(d, "expert", n_experts)
    layers = sorted_layers(d["layer"])
    grid = d.pivot_table(index="layer", columns="expert", values=value, aggfunc="mean").reindex(index=layers, columns=range(E))
    z = grid.to_numpy(dtype=float) * (100.0 if percent else 1.0)
    fig = go.Figure(go.Heatmap(
        z=z, x=[expert_label(e) for e in range(E)], y=[layer_label(v) for v in layers], colorscale=SEQUENTIAL_SCALE,
        colorbar=dict(title=dict(text=what, side="right")), hoverongaps=False, name=value,
        hovertemplate=f"layer %{{y}} · expert %{{x}}<br>{what} %{{z:.3f}}<extra></extra>",
    ))  # fmt: skip
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", nticks=min(E, 32))
    dd = d.dropna(subset=[value])
    finding = ""
    if len(dd):
        r = dd.loc[dd[value].idxmax()]
        finding = f"Highest {what}: {expert_label(r['expert'])} in layer {layer_label(r['layer'])} ({r[value]:.2f})."
    return finish_figure(fig, name, title, finding, x_title="expert", y_title="layer", height=max(320, 140 + 40 * len(layers)))


def top_tokens_bar(df: pd.DataFrame, *, layer: int, expert: int, n: int = 20, title: str | None = None) -> go.Figure:
    """The tokens an expert receives most (``expert_top_tokens`` output: ``token, count`` [, ``share``])."""
    name = "top_tokens_bar"
    ttl = title or f"Top tokens of {expert_label(expert)} in layer {layer_label(layer)}"
    if df is None or df.empty:
        return empty_figure(name, ttl, f"{expert_label(expert)} in layer {layer_label(layer)} received no tokens.")
    c = pick(df, ["count", "n"], "count")
    t = pick(df, ["token", "text"], "token")
    top = df.nlargest(n, c).iloc[::-1]
    shown = [repr(str(v))[1:-1] if isinstance(v, str) else str(v) for v in top[t]]
    # Category axes merge equal strings: keep distinct token texts distinct.
    seen: dict[str, int] = {}
    ys = []
    for s in shown:
        seen[s] = seen.get(s, 0) + 1
        ys.append(s if seen[s] == 1 else f"{s} ({seen[s]})")
    fig = go.Figure(
        go.Bar(
            x=top[c],
            y=[f"‘{s}’" for s in ys],
            orientation="h",
            marker_color=expert_color(expert, layer),
            name="tokens",
            hovertemplate="%{y}<br>%{x} times<extra></extra>",
        )
    )
    fig.update_yaxes(type="category")
    return finish_figure(
        fig,
        name,
        ttl,
        F.top_tokens_finding(df, layer, expert),
        x_title="times routed to this expert",
        y_title="token",
        height=max(300, 110 + 22 * len(top)),
    )
