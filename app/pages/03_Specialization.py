"""Specialization: which experts serve which labels (domains) and which tokens."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens import viz  # noqa: E402
from workbench import ui  # noqa: E402

page = ui.setup(
    "Specialization",
    "Domain specialization (OLMoE §5): the fraction of a label's tokens that have an expert in their top-k, "
    "against the uniform k/E; and vocabulary specialization: how consistently each token id goes to one expert.",
    icon="🎯",
)

if len(page.labels) < 1:
    st.info("This run's sequences have no labels. Record with labels (e.g. one file per domain) to see domain specialization.")
else:
    st.header("Does routing depend on the label?")
    summary = page.call("domain_summary")
    if summary is not None:
        c1, c2 = st.columns([3, 2])
        with c1:
            ui.figure(viz.domain_summary_chart(summary), "spec_summary", ui.slug(page, "domain_summary"))
        with c2:
            ui.table(summary, "spec_summary_table", ui.slug(page, "domain_summary"))

    st.header("Domain specialization per expert")
    spec = page.call("domain_specialization")
    if spec is not None:
        value = next((c for c in ("specialization", "spec", "share") if c in spec.columns), None)
        ids = sorted(int(v) for v in spec["layer"].unique())
        best = int(spec.loc[spec[value].idxmax(), "layer"]) if value and spec[value].notna().any() else (ids[0] if ids else None)
        layer = st.selectbox("Layer", ids, index=ids.index(best) if best in ids else 0, key="spec_layer", format_func=lambda v: f"L{v}")
        ui.figure(viz.specialization_heatmap(spec, layer=layer, value=value), "spec_heat", ui.slug(page, "specialization", layer))
        with st.expander("Specialization table (all layers)"):
            ui.table(spec, "spec_table", ui.slug(page, "domain_specialization"))

st.header("Vocabulary specialization")
c1, c2 = st.columns([1, 3])
target = c1.radio(
    "Token paired with the routing",
    ["input", "next", "predicted"],
    key="spec_target",
    help="input: the token itself; next: the ground-truth next token; predicted: the model's argmax prediction (needs it recorded)",
)
min_count = c1.number_input("Minimum occurrences per token id", 1, 1000, 10, key="spec_min_count",
                            help="Token ids seen fewer times are left out (rare ids inflate the score; 1 reproduces OLMoE)")
vocab = page.call("vocabulary_specialization", target=target, min_count=int(min_count))
with c2:
    if vocab is not None:
        ui.figure(
            viz.layer_score_chart(vocab, "score", title=f"Vocabulary specialization ({target} token)",
                                  what="vocabulary specialization", name="vocabulary_specialization"),
            "spec_vocab_fig", ui.slug(page, "vocabulary_specialization", target),
        )
by_expert = page.call("vocabulary_by_expert", quiet=True, target=target, min_count=int(min_count))
if by_expert is not None and len(by_expert):
    ui.figure(
        viz.layer_expert_heatmap(by_expert, "score", title="Vocabulary specialization of the token ids each expert owns",
                                 what="mean p_x", name="vocabulary_by_expert"),
        "spec_vocab_expert_fig", ui.slug(page, "vocabulary_by_expert", target),
    )
    with st.expander("Vocabulary tables"):
        if vocab is not None:
            ui.table(vocab, "spec_vocab", ui.slug(page, "vocabulary_specialization", target))
        ui.table(by_expert, "spec_vocab_expert", ui.slug(page, "vocabulary_by_expert", target))
