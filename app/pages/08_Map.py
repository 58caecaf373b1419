"""Map: every (layer, expert) placed in 2-D by its routing profile (UMAP), coloured by layer or dominant label."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens import viz  # noqa: E402
from moelens.errors import MoelensError  # noqa: E402
from workbench import data, queries, ui  # noqa: E402

page = ui.setup(
    "Map",
    "A 2-D layout of all (layer, expert) pairs: experts that receive similar tokens (or similar labels) sit close "
    "together. Colour by layer to see whether experts cluster by depth, by dominant label to see domains.",
    icon="🗺️",
)

c1, c2 = st.columns(2)
profile = c1.radio("Profile", ["label", "token"], key="map_profile", horizontal=True,
                   format_func=lambda p: {"label": "labels it serves", "token": "tokens it receives"}[p],
                   help="label: each expert's specialization over the labels; token: its distribution over the most frequent token ids")
color = c2.radio("Colour by", ["dominant label", "layer", "expert"], key="map_color", horizontal=True)
if profile == "label" and not page.labels:
    st.info("This run has no labels; using the token profile instead.")
    profile = "token"

key = ("expert_map", str(page.db), page.stamp, page.run, profile)
if not (data.was_computed(key) or queries.map_is_cached(str(page.db), "expert_map", page.run, profile=profile)):
    st.info("The map is a UMAP layout; the first one takes a while (UMAP compiles its kernels), then it is kept on "
            "disk for this run (moelens demo computes the demo's maps ahead).")
    if not st.button("Compute the map", key="map_go", type="primary"):
        st.stop()
try:
    with st.spinner("Computing the map …"):
        emap = queries.umap_map(str(page.db), page.stamp, "expert_map", page.run, (("profile", profile),))
except MoelensError as exc:
    st.warning(str(exc))
    emap = None
if emap is not None:
    data.mark_computed(key)
    color_by = {"layer": "layer", "dominant label": "dominant_label", "expert": "expert"}[color]
    if color_by == "dominant_label" and "dominant_label" not in emap.columns:
        color_by = "layer"
    ui.figure(viz.expert_map_scatter(emap, color_by=color_by, labels=page.labels), "map_fig", ui.slug(page, "expert_map", profile))
    with st.expander("Map coordinates"):
        ui.table(emap, "map_table", ui.slug(page, "expert_map", profile))
