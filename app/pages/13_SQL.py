"""SQL console: read-only SELECT queries over the trace store, with bound parameters, a row cap and CSV download."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens.errors import MoelensError  # noqa: E402
from workbench import sql_console, ui  # noqa: E402

page = ui.setup(
    "SQL console",
    "Ask the store anything in DuckDB SQL, read-only: one SELECT (or WITH … SELECT) at a time; values go in as "
    "bound parameters (? with a JSON list, $name with a JSON object); results are capped and downloadable.",
    icon="🗄️",
)
st.session_state.pop(ui.N_KEY, None)  # the result's own row count is its n

with st.expander("Tables and columns", expanded=False):
    try:
        ui.table(sql_console.schema(page.db), "sql_schema", "moelens_schema", height=300)
    except MoelensError as exc:
        st.warning(str(exc))

names = list(sql_console.EXAMPLES)
example = st.selectbox("Example", names, key="sql_example")
if st.session_state.get("_sql_example_loaded") != example:  # a new example replaces the editor's text
    st.session_state["_sql_example_loaded"] = example
    st.session_state["sql_text"], st.session_state["sql_params"] = sql_console.EXAMPLES[example]
sql = st.text_area("Query", key="sql_text", height=160)
c1, c2 = st.columns([3, 1])
params_text = c1.text_input("Parameters (JSON)", key="sql_params", placeholder='[1]  or  {"run": 1}')
limit = c2.number_input("Row limit", 1, sql_console.MAX_ROWS, 1000, key="sql_limit")
if st.button("Run", key="sql_go", type="primary") or st.session_state.get("_sql_ran"):
    st.session_state["_sql_ran"] = True
    try:
        rows, truncated = sql_console.run_query(page.db, sql, sql_console.parse_params(params_text), limit=int(limit))
    except MoelensError as exc:
        st.error(str(exc))
    else:
        if truncated:
            st.warning(f"Showing the first {int(limit):,} rows; raise the row limit or narrow the query.")
        ui.table(rows, "sql_result", "moelens_query", n=f"n = {len(rows):,} rows returned")
