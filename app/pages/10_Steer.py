"""Steer: load a model, disable / force / boost / gate-scale experts, generate baseline and steered text side by
side, measure the effect per position, on a labelled dataset and over a grid of strengths (against random
controls). Nothing is written to the store unless the user asks ("Save as runs").

This is the only page that imports torch, and only once a model is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens import viz  # noqa: E402
from workbench import steer_effects, steer_support, ui  # noqa: E402

st.set_page_config(page_title="Steer · moelens", page_icon="🕹️", layout="wide")
db = ui.resolve_db()
st.session_state.pop(ui.N_KEY, None)  # no run behind this page: each table says its own n
st.title("Steer")
st.caption(
    "Change the routing of a loaded model — disable experts, force them into the top-k, shift their router "
    "logits, scale their gate weights — and compare its greedy generation with the unsteered baseline, per position "
    "and on a labelled dataset, against random experts of the same layers. Nothing is saved unless you press "
    "**Save as runs** (the steered run then records its parent run and the intervention, for Compare)."
)
st.sidebar.markdown(f"**Store** `{db}`")

steering_ready = steer_support.available()
if not steering_ready:
    st.info("Steering needs `moelens.steering`, which this install does not have. The controls show what the page "
            "does; generation is disabled.")

# -- 1. model -------------------------------------------------------------------------------------------
st.header("1 · Model")
demo_dir = steer_support.demo_model_dir()
sources = ["bundled demo model", "local folder or hub id"]
c1, c2 = st.columns([1, 2])
source = c1.radio("Model", sources, key="steer_source", index=0 if demo_dir is not None else 1)
if source == sources[0]:
    model_ref = str(demo_dir) if demo_dir is not None else ""
    c2.text_input("Folder", value=model_ref or "(the demo model is not installed)", disabled=True, key="steer_demo_path")
else:
    model_ref = c2.text_input("Folder or hub id", key="steer_path", placeholder="/path/to/model",
                              help="A folder with config.json and .safetensors weights, or a hub id: taken from the "
                                   "local Hugging Face cache, downloaded first if this machine is online and it is "
                                   "not cached (HF_HUB_OFFLINE=1 forbids downloads).")

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
if source == sources[0] and loaded and st.session_state.get("_steer_defaults_for") != loaded:
    # Once per loaded demo model: its output visibly changes under the default prompt with these experts disabled.
    st.session_state["_steer_defaults_for"] = loaded
    st.session_state["steer_disable"] = [p for p in steer_support.DEMO_DISABLE if p in pairs]


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
if spec is not None and spec.is_empty:
    st.caption("Choose at least one expert to disable, force, boost or gate-scale.")
elif spec_error:
    st.warning(spec_error)
    cleared = [k for k in steer_support.RESULT_KEYS if st.session_state.pop(k, None) is not None]
    if cleared:  # a result for a spec that no longer holds would mislead
        st.info("The results shown before were for an earlier intervention and have been cleared.")
elif spec is not None:
    st.caption(f"Intervention: **{ui.md_escape(spec.describe())}**")

# -- 3. generate ----------------------------------------------------------------------------------------
st.header("3 · Generate")
prompt = st.text_area("Prompt", value=steer_support.DEFAULT_PROMPT, key="steer_prompt", height=100)
c1, c2, c3 = st.columns(3)
max_new = c1.number_input("New tokens", 1, 256, 24, key="steer_new")
n_random = c2.number_input("Random controls", 0, 10, 0, key="steer_random",
                           help="Also run random interventions of the same shape, to see whether the effect is specific")
label = c3.text_input("Label for saved runs", value="steer", key="steer_label")
can_run = bool(steering_ready and loaded and prompt and spec is not None and not spec.is_empty)
request = {"prompt": prompt, "max_new_tokens": int(max_new), "n_random": int(n_random), "label": label or None}
if st.button("Generate baseline and steered", key="steer_go", disabled=not can_run, type="primary",
             help="Generates and measures in a scratch store; the trace store is not touched."):
    try:
        with st.spinner("Generating …"):
            model, tok = steer_support.load(loaded)
            st.session_state["steer_result"] = steer_support.run_pair(model, tok, db, spec=spec, **request)
    except Exception as exc:  # noqa: BLE001
        ui.show_error("Generation failed", exc)
elif not can_run and steering_ready:
    st.caption("Load a model, choose at least one expert to change, and write a prompt.")

# -- 4. result ------------------------------------------------------------------------------------------
res = st.session_state.get("steer_result")
if res:
    st.header("Baseline vs steered")
    if spec is not None and res["describe"] != spec.describe():
        st.info(f"These results are for **{ui.md_escape(res['describe'])}**; the intervention above has changed "
                "since. Generate again to see the current one.")
    if res.get("runs"):
        base_run, steered_run = res["runs"]
        st.success(f"Saved as run #{base_run} (baseline) and run #{steered_run} (steered, parent #{base_run}) in "
                   f"`{res['db']}`. Pick them in the sidebar of any page; Compare shows them layer by layer.")
    elif st.button("Save as runs", key="steer_save_runs", disabled=not loaded,
                   help=f"Record the baseline, the steered run and any controls into {db}"):
        try:
            with st.spinner("Recording the runs …"):
                model, tok = steer_support.load(loaded)
                saved = steer_support.run_pair(model, tok, db, spec=steer_support.spec_of(res), save=True, **res["request"])
            st.session_state["steer_result"] = res = saved
            st.rerun()
        except Exception as exc:  # noqa: BLE001
            ui.show_error("Saving failed", exc)
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
        st.markdown(f"**Next-token loss on the prompt** (baseline vs steered; KL of the next-token distributions; "
                    f"n = {int(res['loss']['n_tokens'].max()) if len(res['loss']) else 0} predicted tokens)")
        ui.table(res["loss"], "steer_loss", "moelens_steer_loss")
    with c2:
        st.markdown("**Routing shift** (share of tokens whose expert set changed, per layer)")
        ui.table(res["routing"], "steer_routing", "moelens_steer_routing")
    if res.get("control") is not None:
        st.markdown(f"**Against random controls** (is the effect specific to the chosen experts? n = "
                    f"{int(res['control']['n_random'].max())} controls)")
        steer_support.warn_few_controls(res["control"])
        ui.table(res["control"], "steer_control", "moelens_steer_control")

# -- 5. per-position effects ----------------------------------------------------------------------------
if can_run:
    st.header("4 · Effect per position")
    st.caption("Teacher-forced on the text below: for every token, its log-prob given the prefix without and with "
               "the intervention, the KL divergence of the two next-token distributions and the top-5 predictions.")
    default_text = prompt + (res["generated"] if res and res.get("generated") else "")
    text = st.text_area("Text", value=default_text, key="steer_pos_text", height=90)
    if st.button("Measure per position", key="steer_pos_go", disabled=not text):
        try:
            with st.spinner("Two forward passes …"):
                model, tok = steer_support.load(loaded)
                st.session_state["steer_positions"] = steer_effects.position_effects(model, tok, text, spec)
        except Exception as exc:  # noqa: BLE001
            ui.show_error("Measuring failed", exc)
    effects = st.session_state.get("steer_positions")
    if effects is not None:
        changed = int(effects["top1_changed"].sum())
        st.markdown(f"n = {len(effects)} predicted tokens; the most likely next token changed at {changed}; "
                    f"mean KL {effects['kl'].mean():.3f} nats; mean Δ log-prob {effects['delta_logprob'].mean():+.3f}.")
        ui.table(effects, "steer_pos_table", "moelens_steer_positions", height=320, column_config={
            "delta_logprob": st.column_config.NumberColumn(format="%+.3f"),
            "kl": st.column_config.ProgressColumn(format="%.3f", min_value=0.0,
                                                  max_value=max(float(effects["kl"].max()), 1e-9))})

    # -- 6. labelled dataset and dose-response ----------------------------------------------------------
    st.header("5 · On a labelled dataset, over a grid of strengths")
    picked = steer_support.dataset_picker(db)
    if picked is not None:
        texts, labels, describe = picked
        st.caption(f"{describe}: n = {len(texts)} sequences, cut to 128 tokens each.")
        c1, c2, c3 = st.columns(3)
        n_ctrl = c1.number_input("Random controls", 2, 20, steer_effects.MIN_CONTROLS, key="steer_ds_random")
        strengths = steer_support.dose_kinds(spec)
        what = c2.selectbox("Vary", list(strengths), key=f"steer_dose_what_{'_'.join(strengths)}",
                            format_func=strengths.get) if strengths else None
        grid_text = c3.text_input("Grid", value="0, 1, 2, 4, 8", key="steer_dose_grid",
                                  help="Comma-separated values of the boost offset (logits or std) or of β")
        grid = steer_support.parse_grid(grid_text)
        if not strengths:
            st.caption("The dose–response varies a boost offset or a gate-scale β: add a boosted or gate-scaled expert.")
        elif not grid:
            st.warning(f"The grid {grid_text!r} is not a comma-separated list of numbers.")
        b1, b2 = st.columns(2)
        if b1.button("Measure on the dataset", key="steer_ds_go"):
            try:
                with st.spinner(f"Baseline, steered and {n_ctrl} controls on {len(texts)} sequences …"):
                    model, tok = steer_support.load(loaded)
                    st.session_state["steer_dataset"] = steer_support.dataset_effect(
                        model, tok, texts, labels, spec, n_random=int(n_ctrl))
            except Exception as exc:  # noqa: BLE001
                ui.show_error("Measuring failed", exc)
        if b2.button("Run the dose–response", key="steer_dose_go", disabled=not (strengths and grid)):
            try:
                with st.spinner(f"{len(grid)} strengths × ({n_ctrl} controls + steered) on {len(texts)} sequences …"):
                    model, tok = steer_support.load(loaded)
                    st.session_state["steer_dose"] = (what, steer_effects.dose_response(
                        model, tok, texts, labels, spec, what, grid, n_random=int(n_ctrl)))
            except Exception as exc:  # noqa: BLE001
                ui.show_error("Dose–response failed", exc)
        summary = st.session_state.get("steer_dataset")
        if summary is not None:
            st.markdown(f"**Per label, against random controls** (n = {int(summary['n_tokens'].sum())} predicted "
                        f"tokens, {int(summary['n_random'].max())} controls; p_perm = permutation p-value)")
            steer_support.warn_few_controls(summary)
            ui.table(summary, "steer_ds_table", "moelens_steer_dataset")
        dose = st.session_state.get("steer_dose")
        if dose is not None:
            kind, frame = dose
            ui.figure(viz.dose_response_chart(frame, what=strengths.get(kind, kind)), "steer_dose_chart",
                      "moelens_steer_dose_response")
            steer_support.warn_few_controls(frame)

# -- 5. routing strategies (top-k / top-p sweep; the section lives in workbench.strategies_section) ----------
from workbench import strategies_section  # noqa: E402

strategies_section.render(loaded if steering_ready else None, layout)
