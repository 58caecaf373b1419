"""Co-activation: which experts are picked together for the same token, and how top-1 choices flow across layers."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens import viz  # noqa: E402
from workbench import ui  # noqa: E402

page = ui.setup(
    "Co-activation",
    "P(j | i): when expert i is in a token's top-k, how often j is too (all C(k,2) pairs; the OLMoE "
    "adjacent-pair variant reproduces that paper's figure). Uniform routing gives (k−1)/(E−1).",
    icon="🔗",
)

if page.top_k < 2:
    st.info(f"This run routes one expert per token (k = {page.top_k}), so no experts are ever picked together.")
else:
    c1, c2 = st.columns([1, 2])
    with c1:
        layer = ui.layer_select(page, "co_layer")
    variant_label = c2.radio(
        "Pairs counted", ["all pairs", "OLMoE adjacent-pair (figure reproduction)"], key="co_variant", horizontal=True
    )
    variant = "all" if variant_label == "all pairs" else "adjacent"
    co = page.call("coactivation", variant=variant)
    if co is not None and layer is not None:
        E = page.n_experts
        base = (page.top_k - 1) / (E - 1) if E > 1 else None
        ui.figure(viz.coactivation_heatmap(co, layer=layer, baseline=base), "co_heat", ui.slug(page, "coactivation", variant, layer))
        with st.expander("Co-activation table"):
            ui.table(co[co["layer"] == layer] if "layer" in co.columns else co, "co_table", ui.slug(page, "coactivation", variant, layer))

st.header("Across layers")
tr = page.call("cross_layer_transitions")
if tr is not None:
    lay_col = next((c for c in ("layer", "layer_from", "from_layer") if c in tr.columns), None)
    ids = sorted(int(v) for v in tr[lay_col].unique()) if lay_col else []
    if ids:
        lf = st.selectbox("From layer", ids, key="co_tr_layer", format_func=lambda v: f"L{v}")
        ui.figure(viz.transition_heatmap(tr, layer=lf), "co_tr", ui.slug(page, "transitions", lf))
        with st.expander("Transition table"):
            ui.table(tr[tr[lay_col] == lf], "co_tr_table", ui.slug(page, "transitions", lf))
    else:
        st.info("Transitions need at least two MoE layers.")
