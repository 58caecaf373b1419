"""Figures and the token-coloured HTML view, built from ``moelens.analysis`` results.

One renderer for the CLI, notebooks and the app: every figure builder returns a plotly ``Figure`` that
carries a one-line, self-describing finding (`finding_of`); `token_html` returns a `TokenView` that
notebooks display through ``_repr_html_`` and the app through ``st.html``. No torch, no streamlit here.

>>> from moelens import TraceStore, analysis, viz
>>> store = TraceStore("traces/moelens.duckdb", read_only=True)
>>> viz.load_heatmap(analysis.expert_load(store, 1))          # doctest: +SKIP
"""

from __future__ import annotations

from moelens.viz import findings
from moelens.viz.figures import (
    agreement_chart,
    coactivation_heatmap,
    committee_chart,
    curve_chart,
    domain_summary_chart,
    layer_expert_heatmap,
    layer_score_chart,
    entropy_chart,
    expert_map_scatter,
    figure_html,
    finding_of,
    load_heatmap,
    npmi_bar,
    ranked_experts_bar,
    repetition_chart,
    sch_chart,
    specialization_heatmap,
    srp_chart,
    top_tokens_bar,
    transition_heatmap,
)
from moelens.viz.palette import expert_color, expert_colors, label_color, label_colors
from moelens.viz.tokens import TokenView, token_html

__all__ = [
    "TokenView",
    "agreement_chart",
    "coactivation_heatmap",
    "committee_chart",
    "curve_chart",
    "domain_summary_chart",
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
    "sch_chart",
    "specialization_heatmap",
    "srp_chart",
    "token_html",
    "top_tokens_bar",
    "transition_heatmap",
]
