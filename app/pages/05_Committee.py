"""Committee: experts that every label relies on (the "standing committee", CommitteeAudit)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens import viz  # noqa: E402
from workbench import data, ui  # noqa: E402

#: Fewer units per label than this and a committee (or any ranking over them) is an anecdote.
MIN_UNITS = 5

page = ui.setup(
    "Committee",
    "A standing committee is a small set of experts that ranks high for every label: Pareto-optimal in mean "
    "and variance of rank across labels, present in the top-K lists of at least γ of them (CommitteeAudit, "
    "arXiv 2601.03425). Coverage is its share of the top-K list mass.",
    icon="🏛️",
)

if len(page.labels) < 2:
    st.info(
        f"A standing committee needs at least two labels; this run has {len(page.labels)}. "
        "Record labelled sequences (several domains) to use this page."
    )
    st.stop()

c1, c2, c3, c4 = st.columns(4)
presence = c1.slider("Presence ratio γ", 0.1, 1.0, 0.8, 0.05, key="com_presence",
                     help="Candidates appear in the top-K list of at least γ of the labels")
E = max(2, page.n_experts)
list_length = c2.slider("Top-K list per label", 1, E, min(E, max(page.top_k, 1) * 3), key="com_k",
                        help="How many experts each label's ranked list keeps (the paper uses the model's k)")
unit = c3.radio("Profiled tokens", ["last_prompt_token", "token"], key="com_unit",
                format_func=lambda u: {"last_prompt_token": "last prompt token (paper)", "token": "every token"}[u])
eci = c4.selectbox("Expert contribution index", ["minmax", "frequency", "expected"], key="com_eci",
                   help="minmax: frequency × mean min-max-normalised gate weight (the paper's code); frequency only; "
                        "expected gate weight")

com = page.call("standing_committee", presence_ratio=float(presence), list_length=int(list_length), unit=unit, eci=eci)
seqs = data.sequences(str(page.db), page.stamp, page.run)
units = (seqs.groupby("label")["seq_id"].size() if unit == "last_prompt_token"
         else seqs.groupby("label")["n_tokens"].sum()).reindex(page.labels).fillna(0).astype(int)
unit_name = "sequences (one last prompt token each)" if unit == "last_prompt_token" else "tokens"
n_text = "n = " + ", ".join(f"{int(v):,} {unit_name.split(' ')[0]} of '{k}'" for k, v in units.items())
if int(units.min()) < MIN_UNITS:
    thin = [k for k, v in units.items() if v < MIN_UNITS]
    st.warning(f"The committee rests on fewer than {MIN_UNITS} {unit_name} for {', '.join(map(repr, thin))}: "
               "each such label's ranking is anecdotal. Record more sequences per label, or profile every token.")
if com is not None:
    ui.figure(viz.committee_chart(com), "com_chart", ui.slug(page, "committee"), n=n_text)
    ui.table(com, "com_table", ui.slug(page, "standing_committee"), n=n_text)
    members = {int(r.layer): tuple(int(e) for e in r.committee) for r in com.itertuples()}
    share = page.call("committee_share", committee=members)
    if share is not None and len(share):
        st.header("How much of each label's routing the committee takes")
        st.caption("Over every token of each label: the committee's share of routed slots and of gate mass.")
        ui.table(share, "com_share", ui.slug(page, "committee_share"),
                 column_config={"count_share": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1),
                                "mass_share": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1)})
