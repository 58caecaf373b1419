"""What every figure builder shares: the template, the finding under the title, the empty-figure message.

Every builder in ``moelens.viz`` takes the tidy DataFrame a ``moelens.analysis`` function returns (columns
named in each docstring; close variants are accepted), returns a ``plotly.graph_objects.Figure`` and writes a
one-line, self-describing finding under the title (also kept in ``fig.layout.meta["finding"]``; read it with
`finding_of`). Colours come from `moelens.viz.palette`, so an expert looks the same everywhere. Nothing in a
builder computes a metric: the numbers are the analysis' numbers, only arranged and labelled.
"""

from __future__ import annotations

import textwrap

import pandas as pd
import plotly.graph_objects as go

TEMPLATE = "plotly_white"
FONT = dict(family="system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif", size=13)


def _wrap(text: str, width: int = 110) -> str:
    return "<br>".join(textwrap.wrap(text, width)) if text else ""


def finish_figure(
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


def with_finding(fig: go.Figure, finding: str) -> go.Figure:
    """A copy of a moelens figure whose finding (under the title, and in its metadata) is ``finding``."""
    out = go.Figure(fig)
    meta = dict(fig.layout.meta) if isinstance(fig.layout.meta, dict) else {}
    out.update_layout(title_subtitle_text=_wrap(finding), meta={**meta, "finding": finding})
    return out


def figure_html(fig: go.Figure, *, offline: bool = True) -> str:
    """Standalone HTML for a figure. ``offline=True`` inlines plotly.js (works without internet, ~4.8 MB)."""
    return fig.to_html(include_plotlyjs=True if offline else "cdn", full_html=True, config={"displaylogo": False})


def empty_figure(name: str, title: str, message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return finish_figure(fig, name, title, message, height=260)


def sorted_layers(values) -> list:
    return sorted(pd.unique(pd.Series(values).dropna()))


def one_label(df: pd.DataFrame, label: str | None) -> pd.DataFrame:
    if "label" not in df.columns:
        return df
    if label is not None:
        return df[df["label"] == label]
    labels = df["label"].dropna().unique()
    if len(labels) > 1:
        raise ValueError(f"this frame has one row per label ({list(labels)[:5]}...); pass label=<one of them>")
    return df


def interval(d: pd.DataFrame, col: str, scale: float = 1.0) -> dict | None:
    """Plotly error-bar settings from ``<col>_lo`` / ``<col>_hi`` columns (a bootstrap interval), else None."""
    if f"{col}_lo" not in d.columns or f"{col}_hi" not in d.columns:
        return None
    v = d[col].to_numpy(dtype=float)
    return dict(type="data", symmetric=False, array=(d[f"{col}_hi"].to_numpy(dtype=float) - v) * scale,
                arrayminus=(v - d[f"{col}_lo"].to_numpy(dtype=float)) * scale, thickness=1.2, width=3)
