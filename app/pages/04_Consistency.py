"""Consistency: do consecutive tokens reuse experts? Repetition vs baselines, SRP and SCH curves."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens import viz  # noqa: E402
from workbench import ui  # noqa: E402

page = ui.setup(
    "Consistency",
    "Local routing consistency: how often consecutive tokens keep their experts (Mixtral Table 5) against "
    "uniform and load-aware baselines; SRP (best F1 of one expert set per segment) and SCH (best cache hit "
    "rate with lookahead), as in moe-lrc.",
    icon="🔁",
)

ci = ui.ci_controls("cons")
st.header("Consecutive-token repetition")
rep = page.call_ci("repetition", ci)  # with the shuffled-pairs baselines (from the summaries, else a pass)
if rep is None:  # while that pass waits for Compute: the observed rates and the uniform / Σq² baselines
    rep = page.call_ci("repetition", ci, permutation=False)
if rep is not None:
    ui.figure(viz.repetition_chart(rep), "cons_rep", ui.slug(page, "repetition"),
              n=f"n = {int(rep['n_pairs'].max()):,} consecutive pairs per layer" if "n_pairs" in rep.columns else None)
    with st.expander("Repetition table"):
        ui.table(rep, "cons_rep_table", ui.slug(page, "repetition"))

c1, c2 = st.columns(2)
with c1:
    st.header("SRP")
    seg = st.multiselect("Segment lengths", [2, 4, 8, 16, 32, 64, 128, 256], default=[4, 16, 64, 256], key="cons_seg")
    srp = page.call_ci("srp", ci, segment_lengths=sorted(seg) or [4]) if seg else None
    if srp is not None:
        ui.figure(viz.srp_chart(srp), "cons_srp", ui.slug(page, "srp"))
        with st.expander("SRP table"):
            ui.table(srp, "cons_srp_table", ui.slug(page, "srp"))
with c2:
    st.header("SCH")
    look = st.select_slider("Lookahead (tokens)", [1, 2, 4, 8, 16, 64, 256], value=4, key="cons_look")
    sch = page.call_ci("sch", ci, lookahead=[int(look)])
    if sch is not None:
        ui.figure(viz.sch_chart(sch, lookahead=int(look)), "cons_sch", ui.slug(page, "sch", look))
        with st.expander("SCH table"):
            ui.table(sch, "cons_sch_table", ui.slug(page, "sch", look))

st.header("Across layers")
cl = page.call("cross_layer_consistency")
if cl is not None:
    ui.table(cl, "cons_cross", ui.slug(page, "cross_layer_consistency"))
