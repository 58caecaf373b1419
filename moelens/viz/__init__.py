"""Figures and the token-coloured HTML view, built from ``moelens.analysis`` results.

One renderer for the CLI, notebooks and the app, one module per family of figures (`load`, `specialization`,
`consistency`, `coactivation`, `committee`, `association`, `maps`, `compare`, `steering`, `router`): every
builder returns a plotly ``Figure`` that carries a one-line, self-describing finding (`finding_of`);
`token_html` returns a `TokenView` that notebooks display through ``_repr_html_`` and the app through
``st.html``. No torch, no streamlit here.

>>> from moelens import TraceStore, analysis, viz
>>> store = TraceStore("traces/moelens.duckdb", read_only=True)
>>> viz.load_heatmap(analysis.expert_load(store, 1))          # doctest: +SKIP
"""

from __future__ import annotations

from moelens.viz import findings
from moelens.viz._base import figure_html, finding_of, with_finding
from moelens.viz.association import npmi_bar, ranked_experts_bar
from moelens.viz.coactivation import coactivation_heatmap, transition_heatmap
from moelens.viz.committee import committee_chart
from moelens.viz.compare import agreement_chart
from moelens.viz.consistency import curve_chart, repetition_chart, sch_chart, srp_chart
from moelens.viz.load import entropy_chart, load_heatmap
from moelens.viz.maps import expert_map_scatter, token_map_scatter
from moelens.viz.specialization import (
    domain_summary_chart,
    layer_expert_heatmap,
    layer_score_chart,
    specialization_heatmap,
    top_tokens_bar,
)
from moelens.viz.router import router_confidence_chart
from moelens.viz.steering import dose_response_chart
from moelens.viz.palette import expert_color, expert_colors, label_color, label_colors
from moelens.viz.tokens import TokenView, token_html

__all__ = [
    "TokenView",
    "agreement_chart",
    "coactivation_heatmap",
    "committee_chart",
    "curve_chart",
    "domain_summary_chart",
    "dose_response_chart",
    "layer_expert_heatmap",
    "layer_score_chart",
    "entropy_chart",
    "expert_color",
    "expert_colors",
    "expert_map_scatter",
    "figure_html",
    "finding_of",
    "findings",
    "label_color",
    "label_colors",
    "load_heatmap",
    "npmi_bar",
    "ranked_experts_bar",
    "repetition_chart",
    "router_confidence_chart",
    "sch_chart",
    "specialization_heatmap",
    "srp_chart",
    "token_html",
    "token_map_scatter",
    "top_tokens_bar",
    "transition_heatmap",
    "with_finding",
]
