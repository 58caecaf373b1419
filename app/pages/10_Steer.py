"""Steer: load a model, disable / force / boost / gate-scale experts, generate baseline and steered text side by
side, and save both as runs (the steered run records its parent run and the intervention).

This is the only page that imports torch, and only once a model is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens import viz  # noqa: E402
from workbench import steer_support, ui  # noqa: E402

st.set_page_config(page_title="Steer · moelens", page_icon="🕹️", layout="wide")
db = ui.resolve_db()
st.title("Steer")
st.caption(
    "Change the routing of a loaded model — disable experts, force them into the top-k, shift their router "
    "logits, scale their gate weights — and compare its greedy generation with the unsteered baseline. Both are "
    "saved to the store as runs (the steered run records its parent run and the intervention), so every other "
    "page can analyse them; Compare shows them side by side over all layers."
)
st.sidebar.markdown(f"**Store** `{db}`")

steering_ready = steer_support.available()
if not steering_ready:
    st.info("Steering needs `moelens.steering`, which this install does not have. The controls show what the page "
            "does; generation is disabled.")

# -- 1. model -------------------------------------------------------------------------------------------
st.header("1 · Model")
demo_dir = steer_support.demo_model_dir()
sources = ["bundled demo model", "local path or hub id (offline cache)"]
c1, c2 = st.columns([1, 2])
source = c1.radio("Model", sources, key="steer_source", index=0 if demo_dir is not None else 1)
if source == sources[0]:
    model_ref = str(demo_dir) if demo_dir is not None else ""
    c2.text_input("Folder", value=model_ref or "(the demo model is not installed)", disabled=True, key="steer_demo_path")
else:
    model_ref = c2.text_input("Path or hub id", key="steer_path", placeholder="/path/to/model")

if st.button("Load model", key="steer_load", disabled=not (steering_ready and model_ref), type="primary"):
    try:
        with st.spinner(f"Loading {model_ref} …"):
            steer_support.load(model_ref)  # cached resource: loaded once per process
        st.session_state["steer_loaded"] = model_ref
    except Exception as exc:  # noqa: BLE001 - a bad path or an unsupported model: say so
        ui.show_error(f"Could not load {model_ref}", exc)

loaded = st.session_state.get("steer_loaded")
layout = None
if loaded:
    try:
        layout = steer_support.layout(loaded)
        st.success(f"Loaded `{loaded}`: MoE layers {layout['layers']}, {layout['n_experts']} experts, top-{layout['top_k']}.")
    except Exception as exc:  # noqa: BLE001
        ui.show_error("Could not read the model's MoE layout", exc)
        layout = None
if layout is None:
    layout = steer_support.layout_from_store(db)
    st.caption("Expert choices below follow the store's newest run until a model is loaded.")

# -- 2. intervention ------------------------------------------------------------------------------------
st.header("2 · Intervention")
pairs = [(lay, e) for lay in layout["layers"] for e in range(layout["n_experts"])]


def _name(p: tuple[int, int]) -> str:
    return f"L{p[0]}·E{p[1]}"


c1, c2 = st.columns(2)
disable = c1.multiselect("Disable (never routed)", pairs, key="steer_disable", format_func=_name)
mode = c1.radio("Disabled experts", ["reroute", "zero"], key="steer_mode", horizontal=True,
                format_func=lambda m: {"reroute": "re-route to the next best expert", "zero": "keep the slot, weight 0"}[m])
force = c2.multiselect("Force (always in the top-k)", pairs, key="steer_force", format_func=_name)
c1, c2 = st.columns(2)
boost = c1.multiselect("Boost (add to the router logit before top-k)", pairs, key="steer_boost", format_func=_name)
bc1, bc2 = c1.columns(2)
boost_value = bc1.slider("Offset", -10.0, 10.0, 2.0, 0.5, key="steer_boost_value", disabled=not boost)
boost_unit = bc2.radio("Unit", ["logit", "std"], key="steer_boost_unit", horizontal=True, disabled=not boost,
                       help="std: multiples of each layer's router-logit standard deviation (calibrated on the prompt)")
gate = c2.multiselect("Gate-scale (multiply the gate weight, RICE)", pairs, key="steer_gate", format_func=_name)
beta = c2.slider("β", 0.0, 64.0, 4.0, 0.5, key="steer_beta", disabled=not gate)

spec = None
spec_error = None
if steering_ready:
    try:
        spec = steer_support.make_spec(disable=disable, force=force, boost=boost, boost_value=boost_value,
                                       boost_unit=boost_unit, gate_scale=gate, beta=beta, mode=mode)
    except Exception as exc:  # noqa: BLE001 - e.g. an expert both disabled and forced
        spec_error = str(exc)
if spec_error:
    st.warning(spec_error)
elif spec is not None:
    st.caption(f"Intervention: **{ui.md_escape(spec.describe())}**")

# -- 3. generate ----------------------------------------------------------------------------------------
st.header("3 · Generate")
prompt = st.text_area("Prompt", value="def fibonacci(n):\n    ", key="steer_prompt", height=100)
c1, c2, c3, c4 = st.columns(4)
max_new = c1.number_input("New tokens", 1, 256, 32, key="steer_new")
n_random = c2.number_input("Random controls", 0, 10, 0, key="steer_random",
                           help="Also run random interventions of the same shape, to see whether the effect is specific")
label = c3.text_input("Label for the runs", value="steer", key="steer_label")
save = c4.checkbox("Save the runs to the store", value=True, key="steer_save")
can_run = bool(steering_ready and loaded and prompt and spec is not None and not spec.is_empty)
if st.button("Generate baseline and steered", key="steer_go", disabled=not can_run, type="primary"):
    try:
        with st.spinner("Generating and recording …"):
            model, tok = steer_support.load(loaded)
            st.session_state["steer_result"] = steer_support.run_pair(
                model, tok, db, prompt, spec, max_new_tokens=int(max_new), label=label or None,
                n_random=int(n_random), save=save,
            )  # fmt: skip
    except Exception as exc:  # noqa: BLE001
        ui.show_error("Generation failed", exc)
elif not can_run and steering_ready:
    st.caption("Load a model, choose at least one expert to change, and write a prompt.")

# -- 4. result ------------------------------------------------------------------------------------------
res = st.session_state.get("steer_result")
if res:
    st.header("Baseline vs steered")
    if res.get("runs"):
        base_run, steered_run = res["runs"]
        st.success(f"Saved as run #{base_run} (baseline) and run #{steered_run} (steered, parent #{base_run}) in "
                   f"`{res['db']}`. Pick them in the sidebar of any page; Compare shows them layer by layer.")
    (ta, ra), (tb, rb) = res["baseline"], res["steered"]
    view_layers = sorted(set(ra["layer"]) | set(rb["layer"])) or layout["layers"]
    layer = st.selectbox("Colour by top-1 expert at layer", view_layers, key="steer_view_layer", format_func=lambda v: f"L{v}")
    diff = steer_support.changed_positions(ta, tb)
    c1, c2 = st.columns(2)
    with c1:
        st.html(viz.token_html(ta, ra, layer=layer, highlight=diff, seq_titles={0: "baseline"}))
    with c2:
        st.html(viz.token_html(tb, rb, layer=layer, highlight=diff, seq_titles={0: f"steered · {res['describe']}"}))
    st.caption(f"Red outline: the {len(diff)} positions whose text differs; dotted underline: generated tokens. "
               "Hover a token for its experts at every layer.")
    c1, c2 = st.columns(2)
    with c1:
        st.markdown("**Next-token loss on the prompt** (baseline vs steered; KL of the next-token distributions)")
        ui.table(res["loss"], "steer_loss", "moelens_steer_loss")
    with c2:
        st.markdown("**Routing shift** (share of tokens whose expert set changed, per layer)")
        ui.table(res["routing"], "steer_routing", "moelens_steer_routing")
    if res.get("control") is not None:
        st.markdown("**Against random controls** (is the effect specific to the chosen experts?)")
        ui.table(res["control"], "steer_control", "moelens_steer_control")

# -- 5. routing strategies (top-k / top-p sweep; the section lives in workbench.strategies_section) ----------
from workbench import strategies_section  # noqa: E402

strategies_section.render(loaded if steering_ready else None, layout)
