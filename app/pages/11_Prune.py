"""Prune: rank experts by an importance score of a run recorded with contributions, see which experts a pruning
removes in each layer and what they were doing, evaluate the pruning against random prunings on the bundled
model, and get the command (or write the checkpoint).

Browsing imports no torch; the evaluation and the checkpoint load the model on request.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import streamlit as st  # noqa: E402

from moelens.errors import MoelensError  # noqa: E402
from moelens.pruning.plan import LayerLayout, plan_from_scores  # noqa: E402
from workbench import data, steer_support, ui  # noqa: E402

SCORES = {"reap": "REAP (gate × output norm)", "easy_ep": "EASY-EP (× residual change)", "ean": "EAN (Σ output norm)",
          "man": "MAN (mean output norm)", "frequency": "frequency (routing only)", "esft": "ESFT gate relevance"}
NEEDS_CONTRIBUTIONS = ("reap", "easy_ep", "ean", "man")

page = ui.setup(
    "Prune",
    "Which experts could go: rank them by how much they contribute (REAP, EASY-EP, EAN) or how often they are "
    "chosen, see the removed experts per layer and their label profiles, and measure the pruning against random ones.",
    icon="✂️",
)
db = str(page.db)
has_contributions = bool((page.info.get("metadata") or {}).get("contributions"))

c1, c2, c3 = st.columns([2, 2, 1])
choices = list(SCORES) if has_contributions else ["frequency", "esft"]
score = c1.selectbox("Score", choices, format_func=SCORES.get, key="prune_score")
keep = c2.slider("Keep (share of experts per layer)", 0.25, 1.0, 0.5, 0.0625, key="prune_keep")
per_layer = c3.radio("Counts", ["uniform", "per layer"], key="prune_mode") == "per layer"
if not has_contributions:
    st.info("This run was recorded without expert contributions, so only routing-based scores are offered. "
            "For REAP, EASY-EP and EAN record with contributions:")
    st.code(f"moelens record MODEL DATA --contributions --db {db}")

scores = page.call(score)
per_layer_experts = data.experts_of(db, page.stamp, page.run)
if scores is None or not per_layer_experts:
    st.stop()
layout = {layer: LayerLayout(n, page.top_k) for layer, n in per_layer_experts.items()}
try:
    plan = plan_from_scores(scores, layout, keep, per_layer=per_layer)
except MoelensError as exc:
    st.warning(str(exc))
    st.stop()

# -- which experts go ---------------------------------------------------------------------------------------
st.header("Experts removed per layer")
removed = set(plan.removed)
n_experts = max(lay.n_experts for lay in layout.values())
ids = sorted(layout)
grid = np.full((len(ids), n_experts), np.nan)
totals = scores.groupby("layer")["score"].transform("sum")
grid[scores["layer"].map({layer: i for i, layer in enumerate(ids)}).to_numpy(), scores["expert"].astype(int).to_numpy()] = np.where(
    totals > 0, scores["score"] / totals.where(totals > 0, 1), 0.0)
marks = [["✕" if (layer, e) in removed else "" for e in range(n_experts)] for layer in ids]
fig = go.Figure(go.Heatmap(z=grid, x=list(range(n_experts)), y=[f"L{v}" for v in ids], text=marks,
                           texttemplate="%{text}", colorscale="Viridis", colorbar_title="share of layer score",
                           hovertemplate="layer %{y} expert %{x}<br>share %{z:.3f}<extra></extra>"))
finding = (f"Keeping {keep:.0%} by {score} removes {len(removed)} of {sum(lay.n_experts for lay in layout.values())} "
           f"experts (✕); colour = the expert's share of its layer's {score} score.")
fig.update_layout(title=f"{score}: removed experts (✕)", xaxis_title="expert", yaxis_title="layer",
                  meta={"finding": finding}, height=120 + 40 * len(ids))
ui.figure(fig, "prune_heatmap", ui.slug(page, "prune", score, keep))

# -- what the removed experts did -------------------------------------------------------------------------
st.header("Label profiles of the removed experts")
load = page.call("expert_load", by_label=True, quiet=True)
table = scores[[(int(r.layer), int(r.expert)) in removed for r in scores.itertuples()]][["layer", "expert", "count", "score"]]
if load is not None and page.labels:
    shares = (load.dropna(subset=["label"]).pivot_table(index=["layer", "expert"], columns="label", values="activation_rate")
              .reset_index())
    table = table.merge(shares, on=["layer", "expert"], how="left")
    st.caption("Per label: the share of that label's tokens routed to the expert (activation rate).")
ui.table(table.sort_values(["layer", "score"]), "prune_removed", ui.slug(page, "prune_removed", score, keep))

def _evaluation_docs(per_domain: int = 2, chars: int = 2000) -> list[dict]:
    """A small labelled sample of the demo corpus: the first odd-numbered held-out documents of each domain."""
    from moelens.demo import load_corpus

    docs: dict[str, list[dict]] = {}
    for d in load_corpus("heldout")[1::2]:
        picked = docs.setdefault(d["domain"], [])
        if len(picked) < per_domain:
            picked.append({"text": d["text"][:chars], "label": d["domain"]})
    return [d for picked in docs.values() for d in picked]


# -- evaluate and write -----------------------------------------------------------------------------------
st.header("Evaluate and write")
demo_dir = steer_support.demo_model_dir()
model_ref = st.text_input("Model the run was recorded from", value=str(demo_dir) if demo_dir else "", key="prune_model")
mode = "--per-layer" if per_layer else "--uniform"
command = (f"moelens prune {model_ref or 'MODEL'} --run {page.run} --db {db} --score {score} --keep {keep:g} {mode} "
           f"--out pruned-{score}-{keep:g}/")
st.code(command, language="bash")
c1, c2 = st.columns(2)
n_random = c1.number_input("Random prunings (controls)", 1, 20, 3, key="prune_n_random")
evaluate = c1.button("Evaluate on the held-out demo texts", key="prune_evaluate", disabled=not (model_ref and demo_dir))
out_dir = c2.text_input("Checkpoint folder", value=f"pruned-{score}-{keep:g}", key="prune_out")
write = c2.button("Write checkpoint", key="prune_write", disabled=not model_ref or per_layer)

if evaluate:
    from moelens.pruning.evaluate import evaluate_pruning

    bar = st.progress(0.0, text="evaluating …")
    try:
        model, tokenizer = steer_support.load(model_ref)
        docs = _evaluation_docs()
        with data.batch(db) as store:
            result = evaluate_pruning(model, tokenizer, store, page.run, docs, scores=tuple(dict.fromkeys([score, "frequency"])),
                                      keep=(keep,), per_layer=per_layer, n_random=int(n_random),
                                      progress=lambda f, text: bar.progress(f, text=text))
        st.session_state["prune_result"] = result
    except MoelensError as exc:
        st.warning(str(exc))
    except Exception as exc:  # noqa: BLE001
        ui.show_error("Evaluation failed", exc)
result = st.session_state.get("prune_result")
if isinstance(result, pd.DataFrame):
    st.caption("Loss (nats/token) on the first odd-numbered held-out demo documents of each domain, before and after; "
               "random = mean and std over the random prunings. For a fair test the calibration run must not contain "
               "these documents (record it on other texts).")
    ui.table(result, "prune_eval", ui.slug(page, "prune_eval", score, keep))

if write:
    try:
        from moelens.pruning.checkpoint import write_checkpoint
        from moelens.pruning.prune import check_run_matches

        model, tokenizer = steer_support.load(model_ref)
        with data.batch(db) as store:
            check_run_matches(store, page.run, model)
        path = write_checkpoint(model, plan, out_dir, tokenizer=tokenizer, provenance={"run": page.run, "store": db})
        st.success(f"Wrote {path} (load with AutoModelForCausalLM.from_pretrained).")
    except MoelensError as exc:
        st.warning(str(exc))
    except Exception as exc:  # noqa: BLE001
        ui.show_error("Writing the checkpoint failed", exc)
