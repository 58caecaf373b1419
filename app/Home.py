"""moelens workbench — Runs: every run in the store, and the run(s) the other pages show.

Start it with ``moelens app --db traces/moelens.duckdb`` or ``streamlit run app/Home.py -- --db PATH``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from workbench import data, ui  # noqa: E402

page = ui.setup(
    "Runs",
    "Every recorded run in this store. Pick the run the other pages show (and a second one for Compare); "
    "the choice follows you across pages and is kept in the URL.",
    icon="🧭",
    second_run=True,
)

overview = data.store_overview(str(page.db), page.stamp)
c1, c2, c3, c4 = st.columns(4)
c1.metric("Runs", f"{overview['runs']:,}")
c2.metric("Sequences", f"{overview['sequences']:,}")
c3.metric("Tokens", f"{overview['tokens']:,}")
c4.metric("Store size", f"{overview['size_bytes'] / 1e6:,.1f} MB")
st.caption(
    f"`{page.db}` · schema {overview['meta'].get('schema_version', '?')} · written by "
    f"{overview['meta'].get('created_by', '?')} · opened read-only"
)

runs = page.runs.copy()
runs["status"] = runs["status"].map(lambda s: ui.STATUS_TEXT.get(s, s))
runs["steering"] = runs["intervention"].map(ui.spec_text)
runs["parent"] = runs["parent_run_id"].map(lambda v: "" if pd.isna(v) else f"#{int(v)}")
runs["created"] = pd.to_datetime(runs["created_at"]).dt.strftime("%Y-%m-%d %H:%M")
shown = runs[
    [
        "run_id",
        "name",
        "model",
        "status",
        "n_layers",
        "n_experts",
        "top_k",
        "n_shared_experts",
        "dtype",
        "n_sequences",
        "n_tokens",
        "labels",
        "parent",
        "steering",
        "created",
    ]
].rename(
    columns={
        "run_id": "run",
        "n_layers": "layers",
        "n_experts": "experts",
        "top_k": "k",
        "n_shared_experts": "shared experts",
        "n_sequences": "sequences",
        "n_tokens": "tokens",
    }
)

st.subheader("All runs")
ui.table(
    shown,
    "runs_table",
    "moelens_runs",
    n=f"n = {len(shown)} runs in the store",
    column_config={
        "run": st.column_config.NumberColumn(format="#%d", width="small"),
        "tokens": st.column_config.NumberColumn(format="%d"),
    },
)

st.subheader(f"Run #{page.run}: {page.info.get('name') or page.info.get('model')}")
info = page.info
left, right = st.columns([3, 2])
with left:
    lay = data.layers(str(page.db), page.stamp, page.run)
    st.markdown(
        f"**Model** `{info.get('model')}` ({info.get('model_type') or 'unknown type'}"
        f"{', revision ' + str(info['revision']) if info.get('revision') else ''}) · "
        f"**routing** {info.get('routing_function') or 'n/a'} · **dtype** {info.get('dtype') or 'n/a'} · "
        f"**device** {info.get('device') or 'n/a'}"
    )
    st.markdown(
        f"**Status** {ui.STATUS_TEXT.get(info.get('status'), info.get('status'))}"
        + (f" — {info['error']}" if info.get("error") else "")
        + f" · **created** {info.get('created_at')} · **finished** {info.get('finished_at') or '—'}"
    )
    if info.get("parent_run_id") is not None and not pd.isna(info.get("parent_run_id")):
        st.markdown(f"**Steered from** run #{int(info['parent_run_id'])} with intervention:")
        st.json(info.get("intervention") or {})
    if len(lay):
        ui.table(lay, "layers_table", ui.slug(page, "layers"))
with right:
    seqs = data.sequences(str(page.db), page.stamp, page.run)
    if len(seqs):
        by_label = (
            seqs.assign(label=seqs["label"].fillna("(no label)"))
            .groupby("label", as_index=False)
            .agg(sequences=("seq_id", "count"), tokens=("n_tokens", "sum"))
        )
        st.markdown("**Labels**")
        ui.table(by_label, "home_labels", ui.slug(page, "labels"))
    meta = info.get("metadata")
    if meta:
        with st.expander("Run metadata"):
            st.json(meta)

st.subheader("Explore")
cols = st.columns(4)
links = [
    ("pages/01_Tokens.py", "Tokens", "Text coloured by expert"),
    ("pages/02_Experts.py", "Experts", "Load, balance, expert profiles"),
    ("pages/03_Specialization.py", "Specialization", "Which experts serve which labels"),
    ("pages/04_Consistency.py", "Consistency", "Repetition, SRP, SCH"),
    ("pages/05_Committee.py", "Committee", "Experts every label uses"),
    ("pages/06_nPMI.py", "nPMI explorer", "Experts for tokens, regexes, labels"),
    ("pages/07_Co-activation.py", "Co-activation", "Experts picked together"),
    ("pages/08_Map.py", "Map", "Experts placed by routing profile"),
    ("pages/09_Compare.py", "Compare", "Two runs over the same tokens"),
    ("pages/10_Steer.py", "Steer", "Disable/force/boost experts and generate"),
]
for i, (path, label, help_) in enumerate(links):
    with cols[i % 4]:
        try:
            st.page_link(path, label=label, help=help_)
        except Exception:  # noqa: BLE001 - page links need the multipage runtime; in bare tests show text
            st.markdown(f"{label} — {help_}")
