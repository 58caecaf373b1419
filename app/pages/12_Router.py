"""Router internals for runs recorded with router logits: entropy, top-1/top-2 margin and near-ties per layer
and per token, and the token map (tokens placed by their router logits)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens import viz  # noqa: E402
from moelens.errors import MoelensError  # noqa: E402
from workbench import data, queries, ui  # noqa: E402

page = ui.setup(
    "Router internals",
    "How sure the router is: the entropy of its softmax over the experts (÷ ln E: 0 = one expert, 1 = uniform), "
    "the margin between its first and second choice, and near-ties (a margin so small that a tiny change of the "
    "hidden state would flip the first choice). Needs a run recorded with router logits.",
    icon="🧭",
)
db, stamp = str(page.db), page.stamp
layers = queries.logit_layers(db, stamp, page.run)
if not layers:
    st.info(f"Run #{page.run} was recorded without router logits. Record one with them:")
    st.code(f"moelens record MODEL texts.txt --logits --db {page.db}", language="bash")
    st.stop()

near_tie = st.slider("Near-tie: top-1 − top-2 probability below", 0.0, 0.2, 0.02, 0.005, key="router_tie")
stats = page.call("router_stats", near_tie=float(near_tie))
if stats is not None:
    ui.figure(viz.router_confidence_chart(stats), "router_fig", ui.slug(page, "router_stats"),
              n=f"n = {int(stats['n_tokens'].max()):,} tokens with logits per layer")
    with st.expander("Per-layer table"):
        ui.table(stats, "router_table", ui.slug(page, "router_stats"))

st.header("Per token")
seqs = data.sequences(db, stamp, page.run)
titles = {int(s): f"#{int(s)} · {lab if isinstance(lab, str) else 'no label'} · {repr(str(t or ''))[1:50]}"
          for s, lab, t in zip(seqs["seq_id"], seqs["label"], seqs["text"])}
c1, c2 = st.columns([3, 1])
with c1:
    seq = ui.synced_select("Sequence", list(titles), key="moelens_seq", qp="seq", format_func=lambda s: titles.get(s, str(s)))
with c2:
    layer = st.selectbox("Layer", layers, key="router_layer", format_func=lambda v: f"L{v}")
per = page.call("router_token_stats", layer=int(layer), seq_id=int(seq), near_tie=float(near_tie))
if per is not None:
    toks, routing = data.sequence_tokens(db, stamp, page.run, int(seq))
    ties = {int(p) for p in per.loc[per["near_tie"], "pos"]}
    routing, hover_note = ui.near_layers(routing, int(layer))
    st.html(viz.token_html(toks, routing, layer=int(layer), highlight=ties, seq_titles={int(seq): f"run #{page.run}"}))
    st.caption(f"Red outline: the {len(ties)} near-ties of n = {len(per)} tokens at L{layer}; colour = first choice. {hover_note}")
    ui.table(per, "router_tokens", ui.slug(page, "router_tokens", seq, layer), height=300,
             n=f"n = {len(per)} tokens of sequence #{seq}", column_config={
                 "norm_entropy": st.column_config.ProgressColumn(format="%.2f", min_value=0.0, max_value=1.0),
                 "margin": st.column_config.ProgressColumn(format="%.2f", min_value=0.0, max_value=1.0)})

st.header("Token map")
c1, c2, c3 = st.columns(3)
map_layer = c1.selectbox("Layer", layers, key="router_map_layer", format_func=lambda v: f"L{v}")
n_tokens = c2.number_input("Tokens sampled", 50, 20_000, 2000, step=250, key="router_map_n")
color = c3.radio("Colour by", ["label", "top1"], key="router_map_color", horizontal=True,
                 format_func=lambda c: {"label": "label", "top1": "first choice"}[c])
key = ("token_map", db, stamp, page.run, int(map_layer), int(n_tokens))
if data.was_computed(key) or st.button("Compute the token map", key="router_map_go"):
    try:
        with st.spinner("Computing the token map …"):
            tmap = queries.umap_map(db, stamp, "token_map", page.run, (("layer", int(map_layer)), ("max_tokens", int(n_tokens))))
    except MoelensError as exc:
        st.warning(str(exc))
        tmap = None
    if tmap is not None:
        data.mark_computed(key)
        ui.figure(viz.token_map_scatter(tmap, color_by=color, labels=page.labels), "router_map_fig",
                  ui.slug(page, "token_map", map_layer), n=f"n = {len(tmap):,} sampled tokens")
