"""Loss against compute for routing strategies: the curve a top-k / top-p sweep (`moelens.steering.sweep_routing`)
is read from.

One line per strategy (fixed top-k, dynamic top-p) and label, x = mean experts per token and layer, y = loss
(nats/token); the unmodified model is a star. A strategy is better where its curve lies below another at the same
compute. Numbers are the sweep's; nothing is computed here beyond picking the best point for the finding.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from moelens.viz.palette import label_colors

_DASH = {"top_k": "solid", "top_p": "dot"}
_SYMBOL = {"top_k": "circle", "top_p": "diamond"}


def strategy_curves(sweep: pd.DataFrame, *, labels: list[str] | None = None, metric: str = "loss") -> go.Figure:
    """``sweep``: rows with ``strategy``, ``value``, ``label``, ``experts_per_token`` and ``metric`` (loss,
    delta_loss, ppl or kl). ``labels`` picks which labels to draw (default: ``all`` if present, else every label)."""
    if sweep.empty:
        raise ValueError("the sweep has no rows")
    present = [lab for lab in sweep["label"].drop_duplicates().tolist()]
    chosen = labels or (["all"] if "all" in present else present)
    colours = label_colors([lab for lab in present if lab is not None])
    fig = go.Figure()
    for label in chosen:
        rows = sweep[sweep["label"] == label] if label is not None else sweep[sweep["label"].isna()]
        colour = colours.get(str(label), "#333333") if label != "all" else "#333333"
        for strategy in ("top_k", "top_p"):
            line = rows[rows["strategy"] == strategy].sort_values("experts_per_token")
            if line.empty:
                continue
            name = "k" if strategy == "top_k" else "p"
            fig.add_trace(go.Scatter(
                x=line["experts_per_token"], y=line[metric], mode="lines+markers",
                name=f"{label} · {strategy.replace('_', '-')}", legendgroup=str(label),
                line=dict(color=colour, dash=_DASH[strategy]), marker=dict(symbol=_SYMBOL[strategy], size=8),
                text=[f"{name}={v:g}" for v in line["value"]],
                hovertemplate=f"{label} · %{{text}}<br>experts/token %{{x:.2f}}<br>{metric} %{{y:.4f}}<extra></extra>",
            ))
        native = rows[rows["strategy"] == "native"]
        if not native.empty:
            fig.add_trace(go.Scatter(
                x=native["experts_per_token"], y=native[metric], mode="markers", name=f"{label} · model as trained",
                legendgroup=str(label), marker=dict(color=colour, symbol="star", size=14, line=dict(width=1, color="white")),
                hovertemplate=f"{label} · native<br>experts/token %{{x:.2f}}<br>{metric} %{{y:.4f}}<extra></extra>",
            ))
    finding = _finding(sweep, chosen[0], metric)
    fig.update_layout(
        template="plotly_white",
        title=dict(text=f"<b>{metric} vs experts per token</b>", subtitle=dict(text=finding, font=dict(size=12)), x=0.0),
        xaxis_title="mean experts per token and layer (compute)", yaxis_title=f"{metric} (nats/token)"
        if metric in ("loss", "delta_loss", "kl") else metric,
        meta={"moelens_figure": "strategy_curves", "finding": finding},
        margin=dict(l=60, r=30, t=90, b=50),
    )
    return fig


def _finding(sweep: pd.DataFrame, label: str | None, metric: str) -> str:
    """The cheapest top-p point that is no worse than the model's own routing, or the native point's rank."""
    rows = sweep[sweep["label"] == label]
    native = rows[rows["strategy"] == "native"]
    if native.empty:
        return ""
    base_x, base_y = float(native["experts_per_token"].iloc[0]), float(native[metric].iloc[0])
    dynamic = rows[(rows["strategy"] == "top_p") & (rows[metric] <= base_y)].sort_values("experts_per_token")
    if dynamic.empty:
        return f"{label}: no top-p setting reaches the trained routing's {metric} {base_y:.4f} at {base_x:g} experts/token."
    best = dynamic.iloc[0]
    return (f"{label}: top-p {best['value']:g} matches the trained routing ({metric} {best[metric]:.4f} vs {base_y:.4f}) "
            f"with {best['experts_per_token']:.2f} experts/token instead of {base_x:g}.")
