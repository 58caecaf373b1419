"""Consistency: whether consecutive tokens and repeated spans go to the same experts (repetition, SRP, SCH)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moelens.viz import findings as F
from moelens.viz._base import empty_figure, finish_figure, interval, sorted_layers
from moelens.viz._frames import layer_label, pick


#: Baselines of each observed repetition rate (``repetition`` output) and how the legend names them.
REPETITION_BASELINES: dict[str, dict[str, str]] = {
    "first_choice": {"uniform_first": "uniform routing", "sum_sq_first": "own load, independent (Σq²)",
                     "perm_first": "shuffled pairs"},
    "any_overlap": {"uniform_overlap": "uniform routing", "perm_overlap": "shuffled pairs"},
}  # fmt: skip
_REPETITION_TITLES = {"first_choice": "same first choice", "any_overlap": "any shared expert",
                      "first": "same first choice", "any": "any shared expert"}  # fmt: skip


def repetition_chart(df: pd.DataFrame, *, observed: Sequence[str] | None = None, title: str | None = None) -> go.Figure:
    """Consecutive-token repetition per layer against its baselines (``repetition`` output: ``layer,
    first_choice, any_overlap`` and the baselines ``uniform_first, sum_sq_first, perm_first,
    uniform_overlap, perm_overlap``). Bars are the observed rates, markers the baselines of the same layer.
    Other frames work too: every numeric column named ``<observed>_<kind>`` is drawn as a baseline."""
    name = "repetition_chart"
    ttl = title or "Consecutive tokens routed to the same experts"
    if df is None or df.empty:
        return empty_figure(name, ttl, "No consecutive token pairs.")
    obs = list(observed) if observed else [c for c in ("first_choice", "any_overlap", "first", "any") if c in df.columns]
    if not obs:
        raise ValueError(f"expected first_choice / any_overlap columns; got {list(df.columns)}")
    num_cols = [c for c in df.columns if c != "layer" and pd.api.types.is_numeric_dtype(df[c])]
    d = df.groupby("layer", as_index=False)[num_cols].mean() if df["layer"].duplicated().any() else df
    d = d.sort_values("layer")
    x = [layer_label(v) for v in d["layer"]]
    fig = make_subplots(rows=1, cols=len(obs), subplot_titles=[_REPETITION_TITLES.get(o, o) for o in obs], shared_yaxes=True)
    symbols = ["line-ew-open", "diamond-open", "x-thin-open", "circle-open"]
    base_colors = ["#e15759", "#59a14f", "#9c755f", "#b07aa1"]
    kinds: list[str] = []
    for i, o in enumerate(obs, start=1):
        fig.add_trace(
            go.Bar(
                x=x,
                y=d[o] * 100,
                error_y=interval(d, o, 100),
                name="observed",
                marker_color="#4e79a7",
                legendgroup="observed",
                showlegend=i == 1,
                hovertemplate=f"layer %{{x}}<br>{_REPETITION_TITLES.get(o, o)}: %{{y:.1f}}% of pairs<extra></extra>",
            ),
            row=1,
            col=i,
        )
        known = REPETITION_BASELINES.get(o)
        if known is not None:
            bases = [(c, lab) for c, lab in known.items() if c in d.columns]
        else:
            bases = [(c, c[len(o) + 1 :]) for c in num_cols if c.startswith(f"{o}_") and not c.endswith(("_lo", "_hi", "_n"))]
        for c, kind in bases:
            if kind not in kinds:
                kinds.append(kind)
            j = kinds.index(kind)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=d[c] * 100,
                    mode="markers",
                    marker=dict(symbol=symbols[j % len(symbols)], size=22, line=dict(width=3), color=base_colors[j % 4]),
                    name=f"baseline: {kind}",
                    legendgroup=f"base-{kind}",
                    showlegend=not any(t.legendgroup == f"base-{kind}" for t in fig.data),
                    hovertemplate=f"layer %{{x}}<br>baseline ({kind}): %{{y:.1f}}%<extra></extra>",
                ),
                row=1,
                col=i,
            )
    fig.update_yaxes(title_text="% of consecutive pairs", row=1, col=1, rangemode="tozero")
    fig.update_xaxes(type="category", title_text="layer")
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.25))
    return finish_figure(fig, name, ttl, F.repetition_finding(d), height=440, extra_top=24)


def curve_chart(
    df: pd.DataFrame,
    x: str,
    y: str,
    *,
    group: str = "layer",
    name: str = "curve_chart",
    title: str = "",
    what: str = "value",
    x_title: str | None = None,
    y_title: str | None = None,
    log_x: bool = False,
) -> go.Figure:
    """One line per layer (``group``) of ``y`` against ``x``; lines use the layer's position in a sequential scale."""
    if df is None or df.empty:
        return empty_figure(name, title, f"No data for {what}.")
    groups = sorted_layers(df[group])
    fig = go.Figure()
    import plotly.colors as pc

    cols = pc.sample_colorscale("Viridis", [i / max(1, len(groups) - 1) for i in range(len(groups))]) if groups else []
    for g, c in zip(groups, cols):
        dd = df[df[group] == g].sort_values(x)
        fig.add_trace(
            go.Scatter(
                x=dd[x],
                y=dd[y],
                error_y=interval(dd, y),
                mode="lines+markers",
                name=layer_label(g) if group == "layer" else str(g),
                line=dict(color=c),
                hovertemplate=f"{layer_label(g) if group == 'layer' else g}<br>{x_title or x} %{{x}}<br>{what} %{{y:.3f}}<extra></extra>",
            )
        )
    if log_x:
        xs = sorted(float(v) for v in pd.unique(df[x].dropna()))
        fig.update_xaxes(type="log", tickvals=xs, ticktext=[f"{v:g}" for v in xs])
    return finish_figure(
        fig,
        name,
        title,
        F.curve_finding(df, x, y, what, x_title or x),
        x_title=x_title or x,
        y_title=y_title or what,
        height=380,
    )


def srp_chart(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """SRP (best F1 of a fixed expert set per segment) against segment length, one line per layer
    (``srp`` output: ``layer, segment_length, srp``)."""
    if df is None or df.empty:
        return empty_figure("srp_chart", title or "Segment routing (SRP)", "No data for SRP.")
    x = pick(df, ["segment_length", "m", "seg_len"], "segment length")
    y = pick(df, ["srp", "f1", "value"], "SRP")
    return curve_chart(
        df,
        x,
        y,
        name="srp_chart",
        title=title or "Segment routing best performance (SRP)",
        what="SRP",
        x_title="segment length (tokens)",
        y_title="SRP (best F1)",
        log_x=True,
    )


def sch_chart(df: pd.DataFrame, *, lookahead: int | None = None, title: str | None = None) -> go.Figure:
    """SCH (best cache hit rate with ``lookahead`` tokens of foresight) against cache size, one solid line per
    layer, with the LRU policy dashed in the same colour (``sch`` output: ``layer, policy, m, cache_size,
    cache_ratio, hit_rate``; LRU rows have ``policy='lru'``)."""
    name = "sch_chart"
    if df is None or df.empty:
        return empty_figure(name, title or "Segment cache hit rate (SCH)", "No data for SCH.")
    x = pick(df, ["cache_ratio", "cache_m", "cache_size", "cache"], "cache size")
    y = pick(df, ["hit_rate", "sch", "value"], "hit rate")
    mcol = pick(df, ["m", "lookahead", "segment_length"], "lookahead", required=False)
    pol = "policy" if "policy" in df.columns else None
    sch_rows = df[df[pol] == "sch"] if pol else df
    lru_rows = df[df[pol] == "lru"] if pol else df.iloc[0:0]
    if mcol is not None and len(sch_rows):
        ms = sorted(int(v) for v in sch_rows[mcol].unique())
        if lookahead not in ms:
            lookahead = ms[0]
        sch_rows = sch_rows[sch_rows[mcol] == lookahead]
    ttl = (title or "Segment cache best hit rate (SCH)") + (f" · lookahead {lookahead}" if lookahead is not None else "")
    xt = "cache size (× active experts)" if x in ("cache_ratio", "cache_m") else "cache size (experts)"
    import plotly.colors as pc

    layers = sorted_layers(df["layer"]) if "layer" in df.columns else [None]
    cols = pc.sample_colorscale("Viridis", [i / max(1, len(layers) - 1) for i in range(len(layers))])
    fig = go.Figure()
    for lv, c in zip(layers, cols):
        lname = layer_label(lv) if lv is not None else "model"
        a = sch_rows[sch_rows["layer"] == lv] if lv is not None else sch_rows
        fig.add_trace(go.Scatter(x=a[x], y=a[y] * 100, error_y=interval(a, y, 100), mode="lines+markers", name=lname, legendgroup=lname,
                                 line=dict(color=c), hovertemplate=f"{lname} · SCH<br>cache %{{x}}<br>hit rate %{{y:.1f}}%<extra></extra>"))
        b = lru_rows[lru_rows["layer"] == lv] if lv is not None else lru_rows
        if len(b):
            fig.add_trace(go.Scatter(x=b[x], y=b[y] * 100, mode="lines", name=f"{lname} LRU", legendgroup=lname,
                                     showlegend=False, line=dict(color=c, dash="dash", width=1),
                                     hovertemplate=f"{lname} · LRU<br>cache %{{x}}<br>hit rate %{{y:.1f}}%<extra></extra>"))
    finding = ""
    if len(sch_rows):
        xs = np.sort(sch_rows[x].unique())
        at = 2.0 if x == "cache_ratio" and np.isclose(xs, 2.0).any() else float(xs[len(xs) // 2])
        sub = sch_rows[np.isclose(sch_rows[x], at)].dropna(subset=[y])
        if len(sub):
            r = sub.loc[sub[y].idxmax()]
            size = f"{at:g}× the active experts" if x == "cache_ratio" else f"{at:g} experts"
            finding = f"With a cache of {size}"
            if lookahead is not None:
                finding += f" and {lookahead} tokens of lookahead"
            lname = layer_label(r["layer"]) if "layer" in sub.columns else "the model"
            finding += f", layer {lname} hits {r[y] * 100:.1f}%" if "layer" in sub.columns else f", the model hits {r[y] * 100:.1f}%"
            if len(lru_rows):
                lr = lru_rows[np.isclose(lru_rows[x], at)]
                if "layer" in lru_rows.columns:
                    lr = lr[lr["layer"] == r["layer"]]
                if len(lr):
                    finding += f" (LRU: {lr[y].iloc[0] * 100:.1f}%)"
            finding += "."
    fig.update_yaxes(range=[0, 102])
    fig.update_layout(legend=dict(title_text="solid: SCH · dashed: LRU"))
    return finish_figure(fig, name, ttl, finding, x_title=xt, y_title="hit rate (%)", height=400)
