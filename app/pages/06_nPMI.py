"""nPMI explorer: pick tokens (a set or a regex) or a label and rank the (layer, expert) pairs most
associated with them; or contrast two labels with the SteerMoE risk difference."""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streamlit as st  # noqa: E402

from moelens import viz  # noqa: E402
from moelens.analysis.bootstrap import min_count  # noqa: E402
from workbench import data, ui  # noqa: E402

page = ui.setup(
    "nPMI explorer",
    "Normalised pointwise mutual information between a token predicate and each (layer, expert): "
    "1 = always together, 0 = independent, −1 = never together. Rank experts for a token set, a regex or a label.",
    icon="🧲",
)

mode = st.segmented_control("Select tokens by", ["regex", "token set", "label", "combined (RICE)",
                                                "two labels (risk difference)"],
                            default="regex", key="npmi_mode") or "regex"
c1, c2 = st.columns(2)
n_show = c1.slider("Experts shown", 5, 50, 20, key="npmi_n")
min_events = c2.number_input("Minimum count", 0, 100_000, 5, key="npmi_min",
                             help="Leave out (layer, expert) pairs resting on fewer events: co-occurrences n_xe for "
                                  "nPMI, activations a1 + a2 for the risk difference (a rare pair's score is noise).")
ci = ui.ci_controls("npmi")
result = None
what = ""
value = "npmi"
if mode == "token set":
    raw = st.text_area(
        "Tokens, one per line (exact text: a leading space is part of the token)",
        value=" =\n +\n",
        key="npmi_tokens",
    )
    tokens = tuple(dict.fromkeys(t for t in raw.split("\n") if t != ""))
    if tokens:
        found = data.token_ids_for(str(page.db), page.stamp, page.run, tokens)
        missing = [t for t in tokens if t not in set(found["token"])]
        if missing:
            st.caption("Not in this run: " + ", ".join(repr(t) for t in missing))
        if len(found):
            st.caption("Matched token ids: " + ", ".join(f"{t!r} → {int(i)} ({int(n)}×)" for t, i, n in found.itertuples(index=False)))
            result = page.call_ci("npmi", ci, tokens=sorted(int(i) for i in found["token_id"].unique()))
            what = "tokens " + ", ".join(repr(t) for t in tokens[:6]) + (" …" if len(tokens) > 6 else "")
        else:
            st.info("None of these tokens occurs in this run. Token texts are exact: try a leading space, or use a regex.")
elif mode == "regex":
    rx = st.text_input("Regular expression on token text", value=r"^\s*\d+$", key="npmi_regex")
    if rx:
        result = page.call_ci("npmi", ci, regex=rx)
        what = f"tokens matching /{rx}/"
elif mode == "label":
    if not page.labels:
        st.info("This run has no labels.")
    else:
        lab = st.selectbox("Label", page.labels, key="npmi_label")
        result = page.call_ci("npmi", ci, label=lab)
        what = f"label '{lab}'"
elif mode == "combined (RICE)":
    raw = st.text_area("One predicate per line: COEFFICIENT REGEX (RICE: +1 for the behaviour, -1 for its opposites)",
                       value="1 ^\\s*\\d+$\n-1 ^\\s*[a-z]+$", key="npmi_combined_targets")
    targets, bad = [], []
    for line in (ln.strip() for ln in raw.splitlines()):
        coef, _, rx = line.partition(" ")
        if not line:
            continue
        try:
            targets.append((float(coef), {"regex": rx.strip()}))
        except ValueError:
            bad.append(line)
    if bad:
        st.warning("Not COEFFICIENT REGEX: " + ", ".join(repr(b) for b in bad))
    if targets:
        result = page.call_ci("npmi_combined", None, targets=tuple((c, tuple(t.items())) for c, t in targets))
        what = "Σ coef · nPMI over " + ", ".join(f"{c:+g}·/{t['regex']}/" for c, t in targets)
        value = "score"
else:
    if len(page.labels) < 2:
        st.info("Risk difference needs two labels; this run has fewer.")
    else:
        c1, c2 = st.columns(2)
        a = c1.selectbox("Label A (promote)", page.labels, index=0, key="rd_a")
        b = c2.selectbox("Label B (suppress)", page.labels, index=1, key="rd_b")
        result = page.call_ci("risk_difference", ci, label_a=a, label_b=b)
        what = f"'{a}' vs '{b}'"
        value = "risk_diff"

if result is not None:
    score = {"risk_diff": "risk_difference", "score": "npmi_combined"}.get(value, "npmi")
    before = len(result)
    result = min_count(result, score, int(min_events))
    events = "activations (a1 + a2)" if score == "risk_difference" else "co-occurrences (n_xe)"
    st.caption(f"Minimum count {int(min_events)}: {before - len(result)} of {before} (layer, expert) pairs with fewer "
               f"{events} left out.")
    v = value if value in result.columns else next((c for c in ("npmi", "score", "risk_diff") if c in result.columns), value)
    fig = viz.ranked_experts_bar(result, value=v, n=n_show, what=what, name="npmi_bar" if v != "risk_diff" else "risk_difference_bar",
                                 title=f"Experts most associated with {what}" if v != "risk_diff" else f"Risk difference {what}")
    prm = result.attrs.get("params", {})
    if score == "risk_difference" and "n_tokens_a" in prm:
        n_text = f"n = {prm['n_tokens_a']:,} tokens of '{a}' and {prm['n_tokens_b']:,} of '{b}'"
    elif "n_x" in result.columns and len(result):
        n_text = f"n = {int(result['n_x'].max()):,} tokens in the selection"
    else:
        n_text = None
    clicked = ui.figure(fig, "npmi_fig", ui.slug(page, "npmi" if v != "risk_diff" else "risk_difference"), select=True,
                        n=n_text)
    for point in clicked[:1]:
        m = re.match(r"L(-?\d+) · E(\d+)", str(point.get("y", "")))
        if m:
            ui.link("pages/02_Experts.py", f"Open the profile of E{m.group(2)} in layer L{m.group(1)}",
                    {"run": page.run, "layer": m.group(1), "expert": m.group(2)})
    if not clicked:
        st.caption("Click a bar to open that expert's profile.")
    ui.table(result.sort_values(v, ascending=False, key=(lambda s: s.abs()) if v == "risk_diff" else None),
             "npmi_table", ui.slug(page, "npmi" if v != "risk_diff" else "risk_difference"))
