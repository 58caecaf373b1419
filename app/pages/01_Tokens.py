"""Tokens: a sequence's text with every token coloured by its routing; hover a token for all its layers."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from moelens.viz import token_html  # noqa: E402
from workbench import data, queries, ui  # noqa: E402

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
wrong, n_scored = queries.mispredicted(toks)
outlines = ["search matches", "wrong next-token predictions", "nothing"]
# A search switches the outline to its matches (a fresh widget per with/without search keeps each choice).
outline = st.radio("Outline", outlines, key=f"tok_outline_{'search' if query else 'plain'}", horizontal=True, index=0 if query else 1 if n_scored else 2,
                   help="Wrong next-token predictions: the model's stored greedy prediction (predicted_id) of this "
                        "token from the tokens before it was another token.")
highlight = queries.match_positions(toks, query) if outline == outlines[0] else wrong if outline == outlines[1] else set()
if n_scored:
    st.caption(f"Greedy next-token accuracy on this sequence: {1 - len(wrong) / n_scored:.1%} of n = {n_scored} "
               "predicted tokens (the store keeps the greedy prediction, not the per-token loss).")
if outline == outlines[0] and query:
    st.caption(f"{len(highlight)} tokens overlap a match of {query!r}.")
shown_routing, hover_note = ui.near_layers(routing, layer)
view = token_html(
    toks,
    shown_routing,
    layer=layer,
    highlight=highlight,
    color_by="top1" if mode == "top-1 expert" else "weight",
    expert=expert,
    seq_titles={int(seq): f"Run #{page.run} · sequence #{int(seq)}"},
    labels={int(seq): row["label"] if isinstance(row["label"], str) else None},
)
st.html(view)
if hover_note:
    st.caption(hover_note)

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

with st.expander("Routing table of this sequence (" + ("every layer" if not hover_note else "the hovered layers")
                 + ", every rank)"):
    if routing.empty:
        st.info("No routing rows recorded for this sequence.")
    else:
        wide = shown_routing.merge(toks[["pos", "token"]], on="pos", how="left")
        wide["expert"] = wide["expert"].map(lambda e: "dropped" if e < 0 else f"E{int(e)}")
        wide = wide[["pos", "token", "layer", "rank", "expert", "weight"]]
        ui.table(wide, "tok_routing_table", ui.slug(page, "seq", seq, "routing"))

st.header("Concordance")
c1, c2 = st.columns([3, 1])
default_token = str(toks["token"].iloc[min(3, len(toks) - 1)]) if len(toks) else ""
needle = c1.text_input("Every occurrence of the token (exact text; a leading space is part of it)", value=default_token,
                       key="tok_conc")
conc_layer = layer if layer is not None else (layer_ids[0] if layer_ids else 0)
if needle:
    hits = queries.concordance(db, stamp, page.run, needle, int(conc_layer))
    hits["top1"] = hits["top1"].map(lambda e: "" if pd.isna(e) else "dropped" if e < 0 else f"E{int(e)}")
    c2.metric("occurrences shown", f"{len(hits):,}")
    st.caption(f"Top-1 expert at layer L{conc_layer}; click a row to open that sequence above (first 200 occurrences).")
    picked = ui.table(hits, "tok_conc_table", ui.slug(page, "concordance"), height=260, select=True,
                      n=f"n = {len(hits):,} occurrences of {needle!r}")
    if picked:
        target = int(hits.loc[picked[0], "seq_id"])
        if st.session_state.get("_tok_conc_picked") != (needle, picked[0]):  # a new click: jump to it
            st.session_state["_tok_conc_picked"] = (needle, picked[0])
            st.session_state["moelens_seq"] = target
            st.query_params["seq"] = str(target)
            st.rerun()
