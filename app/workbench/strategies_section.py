"""The Steer page's "Routing strategies" section: sweep fixed top-k and dynamic top-p on a loaded model and plot
loss against experts per token (the compute each strategy spends), with the model as trained as the reference.

Self-contained so the page only calls `render`; torch loads only when a sweep runs.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from moelens.viz.strategies import strategy_curves
from workbench import steer_support, ui

DEFAULT_TEXT = "12 + 7 = 19\n45 - 8 = 37\n6 * 7 = 42\ndef add(a, b):\n    return a + b\n"


def _numbers(text: str, kind: type) -> list[Any]:
    return [kind(v) for v in text.replace(";", ",").split(",") if v.strip()]


def render(loaded: str | None, layout: dict[str, Any]) -> None:
    """Controls, the sweep (on click) and its figure and table; ``loaded`` is the loaded model's ref or None."""
    st.header("5 · Routing strategies")
    st.caption("How much loss does each expert per token buy? Every fixed k and every top-p (each token takes the "
               "smallest set of experts whose router probability reaches p; Huang et al. 2024, arXiv:2403.07652) is "
               "evaluated teacher-forced on the same text as the model as trained (the star).")
    text = st.text_area("Evaluation text (one sequence per paragraph; 'label: text' lines group by label)",
                        value=DEFAULT_TEXT, key="strat_text", height=120)
    c1, c2, c3 = st.columns(3)
    n_experts = int(layout.get("n_experts") or 8)
    ks = c1.text_input("top-k values", value=",".join(str(k) for k in range(1, min(n_experts, 8) + 1)), key="strat_k")
    ps = c2.text_input("top-p values", value="0.3,0.5,0.7,0.9", key="strat_p")
    k_max = c3.number_input("k_max for top-p", 1, max(n_experts, 1), min(n_experts, 8), key="strat_kmax")
    try:
        top_k, top_p = _numbers(ks, int), _numbers(ps, float)
    except ValueError:
        st.warning("top-k values are integers and top-p values numbers, separated by commas")
        return
    if st.button("Run the sweep", key="strat_go", disabled=not loaded, type="primary"):
        try:
            from moelens.steering.sweep import sweep_routing

            model, tok = steer_support.load(loaded)
            docs = _documents(text)
            with st.spinner(f"Evaluating {len(top_k) + len(top_p) + 1} routings …"):
                st.session_state["strat_sweep"] = sweep_routing(model, tok, docs, top_k=top_k, top_p=top_p,
                                                                k_max=int(k_max), seq_len=256)
        except Exception as exc:  # noqa: BLE001 - a bad value or a model whose k is fixed: say so
            ui.show_error("The sweep failed", exc)
    elif not loaded:
        st.caption("Load a model above to run a sweep.")
    sweep = st.session_state.get("strat_sweep")
    if sweep is not None and not sweep.empty:
        ui.figure(strategy_curves(sweep), "strat_fig", "moelens_routing_strategies")
        ui.table(sweep, "strat_table", "moelens_routing_strategies")


def _documents(text: str) -> list[dict]:
    """Paragraphs as documents; a leading ``label:`` on a paragraph's first line becomes its label."""
    docs = []
    for para in (p for p in text.split("\n\n") if p.strip()):
        head, sep, rest = para.partition(":")
        labelled = sep and head.strip().isidentifier() and "\n" not in head
        docs.append({"text": rest.lstrip() if labelled else para, "label": head.strip() if labelled else None})
    return docs


def example_sweep() -> pd.DataFrame:
    """A tiny sweep frame (for tests of the rendering without a model)."""
    rows = [("native", "native", None, 2.0, 3.0), ("top_k=1", "top_k", 1, 1.0, 3.4), ("top_k=2", "top_k", 2, 2.0, 3.0),
            ("top_p=0.5", "top_p", 0.5, 1.6, 3.05), ("top_p=0.9", "top_p", 0.9, 3.1, 2.99)]
    return pd.DataFrame([{"variant": v, "strategy": s, "value": x, "label": "all", "n_tokens": 10, "loss": y,
                          "loss_base": 3.0, "delta_loss": y - 3.0, "ppl": 0.0, "kl": 0.0, "experts_per_token": e}
                         for v, s, x, e, y in rows])
