"""Compare: two runs over the same tokens (steered vs baseline, early vs final checkpoint, bf16 vs fp32)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens import viz  # noqa: E402
from workbench import compare_support, data, ui  # noqa: E402

page = ui.setup(
    "Compare",
    "Routing agreement between two runs over the same tokens, per layer: the mean fraction of top-k choices "
    "both runs made (router saturation when one run is an earlier checkpoint), and the tokens that changed most.",
    icon="⚖️",
    second_run=True,
)
db, stamp = str(page.db), page.stamp
a, b = page.run, page.run_b
if b is None:
    st.info("This store has a single run; record a second run over the same tokens (e.g. a steered run) to compare.")
    st.stop()
if a == b:
    st.info("Pick two different runs (sidebar: Run and Compare with).")
    st.stop()

ia, ib = page.info, page.info_b or {}
ea, eb = ia.get("n_experts"), ib.get("n_experts")
if ea and eb and int(ea) != int(eb):
    st.warning(f"Run #{a} has {int(ea)} experts per layer and run #{b} has {int(eb)}: expert E3 of one is not E3 of "
               "the other, so agreement between them means nothing. Pick two runs of the same model.")
    if not st.checkbox("Show their tokens side by side anyway (no agreement scores)", key="cmp_any_experts"):
        st.stop()
same_experts = not (ea and eb and int(ea) != int(eb))
c1, c2 = st.columns(2)
c1.markdown(f"**A** · #{a} · {ia.get('name') or ia.get('model')}  \n{ui.run_summary(ia)}")
c2.markdown(f"**B** · #{b} · {ib.get('name') or ib.get('model')}  \n{ui.run_summary(ib)}")
spec = ib.get("intervention") if ib.get("parent_run_id") == a else ia.get("intervention") if ia.get("parent_run_id") == b else None
if spec:
    st.caption(f"Intervention: `{ui.spec_text(spec)}`")

agree = page.call_pair("run_agreement", a, b) if same_experts else None
if agree is not None:
    ui.figure(viz.agreement_chart(agree), "cmp_agree", f"moelens_run{a}_vs_run{b}_agreement")
    with st.expander("Agreement table"):
        ui.table(agree, "cmp_agree_table", f"moelens_run{a}_vs_run{b}_agreement")

st.header("Where the routing changed most")
per_seq = None
if agree is not None and len(agree):
    st.caption("The sequences ranked by how much their routing changed: run_agreement of each sequence on its own.")
    per_seq = ui.guarded("sequence_agreement", "Scoring each sequence …", lambda: data.sequence_agreement(db, stamp, a, b))
seqs_a = data.sequences(db, stamp, a)
seqs_b = data.sequences(db, stamp, b)
common = sorted(set(seqs_a["seq_id"]) & set(seqs_b["seq_id"]))
if not common:
    st.info("The two runs share no sequence ids.")
    st.stop()
labels_a = seqs_a.set_index("seq_id")["label"]
texts_a = seqs_a.set_index("seq_id")["text"].fillna("")
worst = None
if per_seq is not None and len(per_seq):
    min_len = st.number_input("Rank only sequences of at least this many tokens", 1, 100_000, 16, key="cmp_min_len",
                              help="A 3-token sequence that changed one token reads as 67% changed: too few tokens "
                                   "to rank by.")
    worst = (per_seq.groupby("seq_id", as_index=False)
             .agg(tokens=("n_tokens", "max"), lowest_topk_overlap=("topk_overlap", "min"),
                  lowest_top1_agreement=("top1_agreement", "min"))
             .sort_values(["lowest_topk_overlap", "seq_id"]))
    short = int((worst["tokens"] < min_len).sum())
    worst = worst[worst["tokens"] >= min_len]
    worst.insert(1, "label", worst["seq_id"].map(labels_a))
    worst.insert(2, "text", worst["seq_id"].map(texts_a.str.slice(0, 80)))
    st.caption(f"Each sequence scored on its own with run_agreement; sorted by its least-agreeing layer. "
               f"n = {len(worst)} sequences ({short} shorter than {min_len} tokens left out).")
    shown_worst = worst.head(200).reset_index(drop=True)
    picked = ui.table(shown_worst, "cmp_worst", f"moelens_run{a}_vs_run{b}_per_sequence", height=260, select=True,
                      column_config={"lowest_topk_overlap": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1),
                                     "lowest_top1_agreement": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1)})
    if picked:
        chosen = int(shown_worst.loc[picked[0], "seq_id"])
        if st.session_state.get("_cmp_picked") != chosen:  # a new click: show that sequence below
            st.session_state["_cmp_picked"] = chosen
            st.session_state["moelens_cmp_seq"] = chosen
            st.query_params["seq"] = str(chosen)
    st.caption("Click a row to show that sequence below.")
order = [int(v) for v in worst["seq_id"]] if worst is not None else []
order += [s for s in common if s not in set(order)]
titles = {s: f"#{s} · {labels_a.get(s) if isinstance(labels_a.get(s), str) else 'no label'} · "
          + repr(str(texts_a.get(s, ""))[:50])[1:-1] for s in order}
c1, c2 = st.columns([3, 1])
with c1:
    seq = ui.synced_select("Sequence (most changed first)" if worst is not None else "Sequence", list(titles),
                           key="moelens_cmp_seq", qp="seq", format_func=lambda s: titles.get(s, str(s)))
with c2:
    layer = ui.layer_select(page, "cmp_layer")
ta, ra = data.sequence_tokens(db, stamp, a, int(seq))
tb, rb = data.sequence_tokens(db, stamp, b, int(seq))
highlight: set[int] = set()
if layer is not None and same_experts:
    highlight = compare_support.changed_expert_sets(ra, rb, layer)
    st.caption(f"{len(highlight)} of n = {ta['pos'].nunique()} tokens in sequence #{seq} changed their expert set "
               f"at layer L{layer}.")
# Text differences (generated continuations) are always outlined.
merged = ta[["pos", "token"]].merge(tb[["pos", "token"]], on="pos", how="outer", suffixes=("_a", "_b"))
highlight |= {int(p) for p in merged.loc[merged["token_a"].fillna("\0") != merged["token_b"].fillna("\0"), "pos"]}
ra, hover_note = ui.near_layers(ra, layer)
rb, _ = ui.near_layers(rb, layer)
c1, c2 = st.columns(2)
with c1:
    st.html(viz.token_html(ta, ra, layer=layer, highlight=highlight, seq_titles={int(seq): f"A · run #{a}"}))
with c2:
    st.html(viz.token_html(tb, rb, layer=layer, highlight=highlight, seq_titles={int(seq): f"B · run #{b}"}))
st.caption("Colour = top-1 expert at the chosen layer in each run; red outline = tokens whose text differs or "
           "whose top-k expert set at this layer differs. Hover a token for its experts per layer. " + hover_note)
