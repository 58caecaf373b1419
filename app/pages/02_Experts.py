"""Experts: load per layer and expert (binary and gate-weighted, per label), balance, dead experts, and one
expert's profile (its tokens with contexts, its labels, the experts picked with it)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens import viz  # noqa: E402
from workbench import data, ui  # noqa: E402

page = ui.setup(
    "Experts",
    "How the load spreads over experts in every layer, which experts are never used, and what one expert does.",
    icon="🧩",
)
db = str(page.db)

# -- load -----------------------------------------------------------------------------------------------
st.header("Load per layer and expert")
labels = page.labels
scope = st.segmented_control(
    "Tokens", ["all tokens", *labels], default="all tokens", key="exp_scope", help="Load over all tokens or one label's"
) or "all tokens"
if scope == "all tokens":
    load = page.call("expert_load")
    label = None
else:
    load = page.call("expert_load", by_label=True)
    label = scope
if load is not None:
    if label is not None:
        load = load[load["label"] == label]
    c1, c2 = st.columns(2)
    top_pct = 100 * float(load[load["expert"] >= 0][["share", "gate_share"]].max().max()) if len(load) else None
    with c1:  # one colour scale for the two views of the same routing
        ui.figure(viz.load_heatmap(load, "share", label=label, n_experts=page.n_experts, zmax=top_pct), "exp_load",
                  ui.slug(page, "load", scope))
    with c2:
        ui.figure(viz.load_heatmap(load, "gate_share", label=label, n_experts=page.n_experts, zmax=top_pct), "exp_gate",
                  ui.slug(page, "gate_load", scope))
    with st.expander("Load table"):
        ui.table(load, "exp_load_table", ui.slug(page, "expert_load", scope))

# -- balance --------------------------------------------------------------------------------------------
st.header("Balance and dead experts")
bal = page.call_on("layer_balance", label)
if bal is not None:
    c1, c2 = st.columns([3, 2])
    with c1:
        ui.figure(viz.entropy_chart(bal), "exp_entropy", ui.slug(page, "balance"))
    with c2:
        st.markdown("**Per layer** (entropy in nats; max/mean = E · largest share)")
        ui.table(bal, "exp_balance_table", ui.slug(page, "layer_balance"))
        if load is not None and "count" in load.columns:
            dead = load[(load["count"] == 0) & (load["expert"] >= 0)][["layer", "expert"]]
            where = "in this run" if label is None else f"of the '{label}' tokens"
            if len(dead):
                st.markdown(f"**Dead experts** ({len(dead)}): never in the top-k of any token {where}")
                ui.table(dead.assign(expert=dead["expert"].map(lambda e: f"E{e}")), "exp_dead", ui.slug(page, "dead"))
            else:
                st.success("No dead experts: every expert was chosen at least once in every layer.")

shared = page.call("shared_expert_stats", quiet=True)  # bounded reads: tells at once whether the run has any
if label is not None and shared is not None and len(shared):
    shared = page.call_on("shared_expert_stats", label)
if shared is not None and len(shared):
    st.markdown("**Shared experts** (always active; gate value per token)")
    ui.table(shared, "exp_shared", ui.slug(page, "shared"))

# -- expert profile -------------------------------------------------------------------------------------
st.header("Expert profile")
c1, c2, c3 = st.columns([1, 1, 2])
with c1:
    ids = page.layer_ids
    layer = ui.synced_select("Layer", ids, key="moelens_prof_layer", qp="layer", format_func=lambda v: f"L{v}") if ids else None
n_exp = data.experts_of(db, page.stamp, page.run).get(layer, page.n_experts) if layer is not None else 0
default_expert = 0
if load is not None and layer is not None:
    lay = load[(load["layer"] == layer) & (load["expert"] >= 0)]
    if len(lay):
        default_expert = int(lay.loc[lay["share"].idxmax(), "expert"])
with c2:
    expert = ui.synced_select(
        "Expert",
        list(range(n_exp)),
        key="moelens_expert",
        qp="expert",
        default=default_expert,
        format_func=lambda e: f"E{e}",
    )
with c3:
    n_top = st.slider("Top tokens", 5, 50, 20, key="exp_ntop")

if layer is not None and expert is not None:
    st.markdown(
        f"<span style='background:{viz.expert_color(expert, layer)};padding:2px 8px;border-radius:4px;color:white'>"
        f"E{expert}</span> in layer L{layer}",
        unsafe_allow_html=True,
    )
    if label is not None:
        st.caption(f"Every section of this page shows the tokens of '{label}' only (the Tokens filter above).")
    top = page.call_on("expert_top_tokens", label, layer=int(layer), expert=int(expert), n=int(n_top), n_contexts=3)
    c1, c2 = st.columns([3, 2])
    with c1:
        if top is not None:
            ui.figure(viz.top_tokens_bar(top, layer=layer, expert=expert, n=n_top), "exp_top", ui.slug(page, "top_tokens", layer, expert))
    with c2:
        by_label = page.call("expert_load", by_label=True)
        if by_label is not None and "label" in by_label.columns:
            mine = by_label[(by_label["layer"] == layer) & (by_label["expert"] == expert)]
            mine = mine[["label", "count", "activation_rate"]].rename(
                columns={"count": "tokens routed here", "activation_rate": "share of the label's tokens"}
            )
            st.markdown("**Labels** (how often each label's tokens pick this expert)")
            ui.table(
                mine,
                "exp_prof_labels",
                ui.slug(page, "expert_labels", layer, expert),
                column_config={"share of the label's tokens": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1)},
            )
        co = page.call_on("coactivation", label) if label is not None else page.call("coactivation", quiet=True)
        if co is not None and len(co):
            a = "expert_i" if "expert_i" in co.columns else co.columns[1]
            mine = co[(co["layer"] == layer) & (co[a] == expert)] if "layer" in co.columns else co[co[a] == expert]
            value_col = next((c for c in ("p_j_given_i", "conditional", "coactivation", "value") if c in mine.columns), None)
            if value_col and len(mine):
                mine = mine.sort_values(value_col, ascending=False).head(8)
                st.markdown("**Picked together with** (P(other | this expert), uniform routing: "
                            f"{mine['baseline'].iloc[0]:.1%})" if "baseline" in mine.columns else "**Picked together with**")
                ui.table(mine, "exp_prof_coact", ui.slug(page, "coactivated", layer, expert))
    if top is not None and len(top):
        st.markdown("**Top tokens with contexts**")
        ui.table(top, "exp_top_table", ui.slug(page, "top_tokens", layer, expert))
