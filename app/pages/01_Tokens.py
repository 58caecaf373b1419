"""Tokens: a sequence's text with every token coloured by its routing; hover a token for all its layers."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from moelens.viz import token_html  # noqa: E402
from workbench import data, ui  # noqa: E402

page = ui.setup(
    "Tokens",
    "Each token of a sequence coloured by its top-1 expert at one layer, or by one expert's gate weight. "
    "Hover a token to see its top-k experts and weights at every layer. Link to a view with ?run=&seq=.",
    icon="🔤",
)
db, stamp = str(page.db), page.stamp
seqs = data.sequences(db, stamp, page.run)
if seqs.empty:
    st.info(f"Run #{page.run} has no sequences yet.")
    st.stop()

with st.container():
    c1, c2 = st.columns([2, 2])
    query = c1.text_input("Search text", key="tok_search", placeholder="e.g. def, Привет, = 12")
    labels = sorted(seqs["label"].dropna().astype(str).unique())
    chosen_labels = c2.multiselect("Labels", labels, key="tok_labels", placeholder="all labels") if labels else []

shown = seqs
if query:
    shown = shown[shown["text"].fillna("").str.contains(query, case=False, regex=False)]
if chosen_labels:
    shown = shown[shown["label"].astype(str).isin(chosen_labels)]
st.caption(f"{len(shown):,} of {len(seqs):,} sequences match.")
if shown.empty:
    st.info("No sequence matches; change the search text or the labels.")
    st.stop()

titles = {
    int(r.seq_id): f"#{int(r.seq_id)} · {r.label if isinstance(r.label, str) else 'no label'} · "
    f"{int(r.n_tokens) if pd.notna(r.n_tokens) else '?'} tokens · "
    + repr(str(r.text or "")[:60])[1:-1]
    for r in shown.itertuples()
}
seq_ids = list(titles)
c1, c2, c3, c4 = st.columns([4, 1, 2, 1])
with c1:
    seq = ui.synced_select("Sequence", seq_ids, key="moelens_seq", qp="seq", format_func=lambda s: titles.get(s, str(s)))
layer_ids = page.layer_ids
with c2:
    layer = ui.layer_select(page, "tok_layer", default=layer_ids[len(layer_ids) // 2] if layer_ids else None)
with c3:
    mode = st.radio("Colour by", ["top-1 expert", "gate weight of one expert"], key="tok_mode", horizontal=False)
expert = None
with c4:
    if mode != "top-1 expert":
        n_exp = data.experts_of(db, stamp, page.run).get(layer, page.n_experts) if layer is not None else page.n_experts
        expert = st.selectbox("Expert", list(range(n_exp)), key="tok_expert", format_func=lambda e: f"E{e}")

toks, routing = data.sequence_tokens(db, stamp, page.run, int(seq))
row = seqs[seqs["seq_id"] == seq].iloc[0]
view = token_html(
    toks,
    routing,
    layer=layer,
    color_by="top1" if mode == "top-1 expert" else "weight",
    expert=expert,
    seq_titles={int(seq): f"Run #{page.run} · sequence #{int(seq)}"},
    labels={int(seq): row["label"] if isinstance(row["label"], str) else None},
)
st.html(view)

prompt_len = row.get("prompt_len")
if "phase" in toks.columns and (toks["phase"] == "generated").any():
    st.caption(f"Dotted underline = generated tokens (the prompt is the first {int(prompt_len)} tokens).")

c1, c2 = st.columns(2)
c1.download_button(
    "Download this view (HTML)",
    data=lambda: view.to_html(f"moelens run {page.run} sequence {seq}"),
    file_name=f"{ui.slug(page, 'seq', seq, 'L', layer)}.html",
    mime="text/html",
    key="tok_html",
    icon=":material/download:",
)

with st.expander("Routing table of this sequence (every layer, every rank)"):
    if routing.empty:
        st.info("No routing rows recorded for this sequence.")
    else:
        wide = routing.merge(toks[["pos", "token"]], on="pos", how="left")
        wide["expert"] = wide["expert"].map(lambda e: "dropped" if e < 0 else f"E{int(e)}")
        wide = wide[["pos", "token", "layer", "rank", "expert", "weight"]]
        ui.table(wide, "tok_routing_table", ui.slug(page, "seq", seq, "routing"))
