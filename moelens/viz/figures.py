"""Plotly figure builders over analysis DataFrames.

Every builder takes the tidy DataFrame a ``moelens.analysis`` function returns (columns named in each
docstring; close variants are accepted), returns a ``plotly.graph_objects.Figure`` and writes a one-line,
self-describing finding under the title (also kept in ``fig.layout.meta["finding"]``; read it with
`finding_of`). Colours come from `moelens.viz.palette`, so an expert looks the same everywhere.
Nothing here computes a metric: the numbers are the analysis' numbers, only arranged and labelled.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from moelens.viz import findings as F
from moelens.viz._frames import expert_label, layer_label, pick
from moelens.viz.findings import _n_experts  # one count of E, so a chart and its finding agree
from moelens.viz.palette import (
    DIVERGING_SCALE,
    SEQUENTIAL_SCALE,
    expert_color,
    label_color,
)

TEMPLATE = "plotly_white"
FONT = dict(family="system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif", size=13)


def _wrap(text: str, width: int = 110) -> str:
    return "<br>".join(textwrap.wrap(text, width)) if text else ""


def _finish(
    fig: go.Figure,
    name: str,
    title: str,
    finding: str,
    *,
    x_title: str | None = None,
    y_title: str | None = None,
    height: int | None = None,
    extra_top: int = 0,
) -> go.Figure:
    n_lines = max(1, _wrap(finding).count("<br>") + 1) if finding else 0
    fig.update_layout(
        template=TEMPLATE,
        font=FONT,
        title=dict(
            text=f"<b>{title}</b>",
            subtitle=dict(text=_wrap(finding), font=dict(size=12, color="#444")),
            x=0.0,
            xanchor="left",
        ),
        margin=dict(l=60, r=30, t=60 + 16 * n_lines + extra_top, b=50),
        meta={"moelens_figure": name, "finding": finding, "extra_top": extra_top},
        hoverlabel=dict(font_size=12),
    )
    if height:
        fig.update_layout(height=height)
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
    return fig


def finding_of(fig: go.Figure) -> str:
    """The one-line finding a moelens figure carries ('' for other figures)."""
    meta = fig.layout.meta
    if isinstance(meta, dict):
        return str(meta.get("finding", ""))
    return ""


def figure_html(fig: go.Figure, *, offline: bool = True) -> str:
    """Standalone HTML for a figure. ``offline=True`` inlines plotly.js (works without internet, ~4.8 MB)."""
    return fig.to_html(include_plotlyjs=True if offline else "cdn", full_html=True, config={"displaylogo": False})


def _empty(name: str, title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _finish(fig, name, title, message, height=260)


def _layers(values) -> list:
    return sorted(pd.unique(pd.Series(values).dropna()))


def _filter_label(df: pd.DataFrame, label: str | None) -> pd.DataFrame:
    if "label" not in df.columns:
        return df
    if label is not None:
        return df[df["label"] == label]
    labels = df["label"].dropna().unique()
    if len(labels) > 1:
        raise ValueError(f"this frame has one row per label ({list(labels)[:5]}...); pass label=<one of them>")
    return df


# -- load and balance -----------------------------------------------------------------------------------


def load_heatmap(
    df: pd.DataFrame,
    value: str = "share",
    *,
    label: str | None = None,
    n_experts: int | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layer × expert heatmap of load (``expert_load`` output: ``layer, expert, <value>`` [, ``label``]).

    ``value`` is ``share`` (binary top-k: fraction of routed slots) or ``gate_share`` (gate-weighted).
    Capacity drops (expert -1) are left out of the grid.
    """
    weighted = "gate" in value
    name = "load_heatmap"
    ttl = title or ("Gate-weighted load" if weighted else "Expert load (top-k slots)") + (f" · {label}" if label else "")
    if df is None or df.empty:
        return _empty(name, ttl, "No routed tokens in this selection.")
    d = _filter_label(df, label)
    if value not in d.columns:
        raise ValueError(f"no column {value!r} in expert_load output (columns: {list(d.columns)})")
    d = d[d["expert"] >= 0]
    E = _n_experts(d, "expert", n_experts)
    layers = _layers(d["layer"])
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
    fig.update_xaxes(type="category", side="bottom")
    return _finish(
        fig,
        name,
        ttl,
        F.load_finding(d, value=value, n_experts=E),
        x_title="expert",
        y_title="layer",
        height=max(260, 120 + 26 * len(layers)),
    )


def entropy_chart(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Normalised load entropy per layer (``layer_balance`` output: ``layer, norm_entropy`` and optionally
    ``effective_experts, imbalance, dead_experts, n_experts``), with the even-spread line at 1."""
    name = "entropy_chart"
    ttl = title or "Load balance per layer"
    if df is None or df.empty:
        return _empty(name, ttl, "No layers to show.")
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
    return _finish(fig, name, ttl, F.balance_finding(d), x_title="layer", y_title="load entropy / ln E", height=340)


# -- specialization -------------------------------------------------------------------------------------


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
        return _empty(name, title or "Domain specialization", "No labelled tokens: label sequences to see specialization.")
    v = value or pick(df, ["specialization", "spec", "share"], "specialization")
    d = df.dropna(subset=[v])
    d = d[d["expert"] >= 0]
    if layer is None:
        layer = int(d.loc[d[v].idxmax(), "layer"]) if len(d) else int(df["layer"].min())
    d = d[d["layer"] == layer]
    ttl = title or f"Domain specialization · layer {layer_label(layer)}"
    if d.empty:
        return _empty(name, ttl, f"No labelled tokens in layer {layer_label(layer)}.")
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
    return _finish(
        fig,
        name,
        ttl,
        F.specialization_finding(d, value=v, baseline=baseline),
        x_title="expert",
        y_title="label",
        height=max(260, 140 + 30 * len(labels)),
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
        return _empty(name, ttl, "No labelled tokens.")
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
    return _finish(fig, name, ttl, finding, x_title="layer", y_title="score", height=380)


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
        return _empty(name, title, f"No data for {what}.")
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
    return _finish(fig, name, title, finding, x_title="layer", y_title=what, height=340)


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
        return _empty(name, title, f"No data for {what}.")
    d = df[df["expert"] >= 0]
    E = _n_experts(d, "expert", n_experts)
    layers = _layers(d["layer"])
    grid = d.pivot_table(index="layer", columns="expert", values=value, aggfunc="mean").reindex(index=layers, columns=range(E))
    z = grid.to_numpy(dtype=float) * (100.0 if percent else 1.0)
    fig = go.Figure(go.Heatmap(
        z=z, x=[expert_label(e) for e in range(E)], y=[layer_label(v) for v in layers], colorscale=SEQUENTIAL_SCALE,
        colorbar=dict(title=dict(text=what, side="right")), hoverongaps=False, name=value,
        hovertemplate=f"layer %{{y}} · expert %{{x}}<br>{what} %{{z:.3f}}<extra></extra>",
    ))  # fmt: skip
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    dd = d.dropna(subset=[value])
    finding = ""
    if len(dd):
        r = dd.loc[dd[value].idxmax()]
        finding = f"Highest {what}: {expert_label(r['expert'])} in layer {layer_label(r['layer'])} ({r[value]:.2f})."
    return _finish(fig, name, title, finding, x_title="expert", y_title="layer", height=max(260, 120 + 26 * len(layers)))


# -- consistency ----------------------------------------------------------------------------------------


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
        return _empty(name, ttl, "No consecutive token pairs.")
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
    return _finish(fig, name, ttl, F.repetition_finding(d), height=440, extra_top=24)


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
        return _empty(name, title, f"No data for {what}.")
    groups = _layers(df[group])
    fig = go.Figure()
    import plotly.colors as pc

    cols = pc.sample_colorscale("Viridis", [i / max(1, len(groups) - 1) for i in range(len(groups))]) if groups else []
    for g, c in zip(groups, cols):
        dd = df[df[group] == g].sort_values(x)
        fig.add_trace(
            go.Scatter(
                x=dd[x],
                y=dd[y],
                mode="lines+markers",
                name=layer_label(g) if group == "layer" else str(g),
                line=dict(color=c),
                hovertemplate=f"{layer_label(g) if group == 'layer' else g}<br>{x_title or x} %{{x}}<br>{what} %{{y:.3f}}<extra></extra>",
            )
        )
    if log_x:
        xs = sorted(float(v) for v in pd.unique(df[x].dropna()))
        fig.update_xaxes(type="log", tickvals=xs, ticktext=[f"{v:g}" for v in xs])
    return _finish(
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
        return _empty("srp_chart", title or "Segment routing (SRP)", "No data for SRP.")
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
        return _empty(name, title or "Segment cache hit rate (SCH)", "No data for SCH.")
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

    layers = _layers(df["layer"]) if "layer" in df.columns else [None]
    cols = pc.sample_colorscale("Viridis", [i / max(1, len(layers) - 1) for i in range(len(layers))])
    fig = go.Figure()
    for lv, c in zip(layers, cols):
        lname = layer_label(lv) if lv is not None else "model"
        a = sch_rows[sch_rows["layer"] == lv] if lv is not None else sch_rows
        fig.add_trace(go.Scatter(x=a[x], y=a[y] * 100, mode="lines+markers", name=lname, legendgroup=lname,
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
    return _finish(fig, name, ttl, finding, x_title=xt, y_title="hit rate (%)", height=400)


# -- co-activation and cross-layer -----------------------------------------------------------------------


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
        return _empty(name, title or "Co-activation", "No co-activated pairs (k = 1 routes one expert per token).")
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
        return _empty(name, ttl, "No co-activated pairs in this layer.")
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
    fig.update_xaxes(type="category", title_text="co-picked expert j")
    fig.update_yaxes(type="category", autorange="reversed", title_text="expert i")
    return _finish(fig, name, ttl, F.coactivation_finding(d, value=v, baseline=baseline), height=max(360, 140 + 22 * E))


def transition_heatmap(df: pd.DataFrame, *, layer: int | None = None, value: str | None = None, title: str | None = None) -> go.Figure:
    """Top-1 expert at one layer → top-1 expert at the next (``cross_layer_transitions`` output:
    ``layer, next_layer, expert, next_expert, <value>``)."""
    name = "transition_heatmap"
    if df is None or df.empty:
        return _empty(name, title or "Cross-layer transitions", "No cross-layer transitions.")
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
        return _empty(name, ttl, "No transitions from this layer.")
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
    return _finish(fig, name, ttl, finding, height=max(360, 140 + 22 * Ea))


# -- committee, nPMI, map -------------------------------------------------------------------------------


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
        return _empty(name, ttl, "No standing committee found (needs at least two labels).")
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
    return _finish(
        fig,
        name,
        ttl,
        F.committee_finding(d.rename(columns={lay: "layer"}) if lay != "layer" else d),
        x_title="layer",
        y_title="coverage (% of top-K mass)",
        height=380,
    )


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
        return _empty(name, ttl, f"No tokens match {what}.")
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
            orientation="h",
            marker_color=[expert_color(int(e)) for e in top["expert"]],
            name=v,
            hovertemplate=f"%{{y}}<br>{v} %{{x:.3f}}<extra></extra>",
        )
    )
    fig.update_yaxes(type="category")
    if v == "npmi":
        fig.update_xaxes(range=[min(-0.05, float(top[v].min()) - 0.05), 1.0])
    return _finish(
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
        return _empty(name, ttl, "No experts to place.")
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

        layers = _layers(df["layer"])
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
    return _finish(
        fig,
        name,
        ttl,
        F.map_finding(df, color=color_by if color_by in df.columns else None),
        x_title="map x",
        y_title="map y",
        height=520,
    )


# -- comparison and expert profile ----------------------------------------------------------------------


def agreement_chart(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Run-vs-run routing agreement per layer (``run_agreement`` output: ``layer, n_tokens, top1_agreement,
    topk_overlap, k, baseline``): bars for the top-k overlap and the same-first-choice rate, the uniform
    chance k/E dashed."""
    name = "agreement_chart"
    ttl = title or "Routing agreement between the two runs"
    if df is None or df.empty:
        return _empty(name, ttl, "The two runs share no aligned tokens.")
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
        fig.add_trace(go.Scatter(x=x, y=d[base] * 100, mode="lines", name="uniform chance", line=dict(dash="dash", color="#888"), hovertemplate="layer %{x}<br>chance %{y:.1f}%<extra></extra>"))
    fig.update_xaxes(type="category")
    fig.update_yaxes(range=[0, 105])
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.2))
    return _finish(fig, name, ttl, F.agreement_finding(d, value=tk), x_title="layer", y_title="% of aligned tokens", height=380)


def top_tokens_bar(df: pd.DataFrame, *, layer: int, expert: int, n: int = 20, title: str | None = None) -> go.Figure:
    """The tokens an expert receives most (``expert_top_tokens`` output: ``token, count`` [, ``share``])."""
    name = "top_tokens_bar"
    ttl = title or f"Top tokens of {expert_label(expert)} in layer {layer_label(layer)}"
    if df is None or df.empty:
        return _empty(name, ttl, f"{expert_label(expert)} in layer {layer_label(layer)} received no tokens.")
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
            marker_color=expert_color(expert),
            name="tokens",
            hovertemplate="%{y}<br>%{x} times<extra></extra>",
        )
    )
    fig.update_yaxes(type="category")
    return _finish(
        fig,
        name,
        ttl,
        F.top_tokens_finding(df, layer, expert),
        x_title="times routed to this expert",
        y_title="token",
        height=max(300, 110 + 22 * len(top)),
    )
