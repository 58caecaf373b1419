"""moelens.viz: figures build from small analysis-shaped DataFrames with the right traces, axes and findings;
the token view escapes HTML and keeps multibyte text exact."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from moelens import viz
from moelens.viz import palette


# -- small frames shaped like the analysis outputs --------------------------------------------------------


def load_df(by_label: bool = False) -> pd.DataFrame:
    rows = []
    labels = ["code", "math"] if by_label else [None]
    for lab in labels:
        for layer in (1, 2):
            counts = np.array([30, 10, 0, 20]) if layer == 1 else np.array([15, 15, 15, 15])
            if lab == "math":
                counts = counts[::-1]
            for e, c in enumerate(counts):
                rows.append(
                    {"layer": layer, "expert": e, "label": lab, "count": int(c), "activation_rate": c / 30,
                     "share": c / counts.sum(), "gate_mass": c * 0.5, "gate_share": c / counts.sum()}
                )
    df = pd.DataFrame(rows)
    return df if by_label else df.drop(columns="label")


def balance_df() -> pd.DataFrame:
    return pd.DataFrame(
        {"layer": [1, 2], "n_experts": [4, 4], "top_k": [2, 2], "n_tokens": [30, 30], "entropy": [1.01, 1.386],
         "norm_entropy": [0.73, 1.0], "effective_experts": [2.75, 4.0], "max_mean": [2.0, 1.0],
         "maxvio": [1.0, 0.0], "cv": [0.75, 0.0], "dead_experts": [1, 0]}
    )


def test_palette_is_stable_and_distinct() -> None:
    assert viz.expert_color(3) == palette.expert_color(3)
    first = viz.expert_colors(24)
    assert len(set(first)) == 24
    many = [viz.expert_color(e) for e in range(256)]
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in many) and len(set(many)) == 256
    # distinct at scale: the worst pair among the first n colours, in CIELAB ΔE (> 2.3 is just noticeable)
    lab = palette._srgb_to_lab(np.array([[int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] for c in many]))
    for n, least in ((16, 40), (64, 20), (256, 10)):
        d = np.linalg.norm(lab[:n, None] - lab[None, :n], axis=-1)
        d[np.diag_indices(n)] = np.inf
        assert d.min() > least, (n, d.min())
    # E3 of one layer is not coloured like E3 of the next: every layer reads the palette from its own offset
    assert viz.expert_color(3, 1) != viz.expert_color(3, 2)
    assert not set(viz.expert_colors(16, 0)) & set(viz.expert_colors(16, 1))
    assert viz.expert_color(-1) == palette.DROPPED_COLOR
    cols = viz.label_colors(["math", "code", None])
    assert set(cols) == {"code", "math"} and cols["code"] != cols["math"]
    assert viz.label_color("math", ["math", "code"]) == cols["math"]
    assert palette.text_color_for("#ffffff") == "#000000" and palette.text_color_for("#000000") == "#ffffff"


def test_load_heatmap_axes_values_and_finding() -> None:
    fig = viz.load_heatmap(load_df(), "share", n_experts=4)
    (hm,) = fig.data
    assert isinstance(hm, go.Heatmap)
    assert list(hm.x) == ["E0", "E1", "E2", "E3"] and list(hm.y) == ["L1", "L2"]
    z = np.asarray(hm.z, dtype=float)
    assert z.shape == (2, 4)
    assert z[0, 0] == pytest.approx(50.0) and z[0, 2] == 0.0  # percent of slots; the dead expert stays 0
    text = viz.finding_of(fig)
    assert text.startswith("Busiest expert: E0 took 50.0% of routed slots in layer L1")
    assert "even spread would be 25.0%" in text
    assert fig.layout.title.subtitle.text  # the finding is under the title (HTML export, notebooks)
    gate = viz.load_heatmap(load_df(), "gate_share")
    assert "gate mass" in viz.finding_of(gate) and "Gate-weighted" in gate.layout.title.text


def test_load_heatmap_per_label() -> None:
    df = load_df(by_label=True)
    with pytest.raises(ValueError, match="pass label="):
        viz.load_heatmap(df)
    fig = viz.load_heatmap(df, label="math")
    assert "math" in fig.layout.title.text
    assert np.asarray(fig.data[0].z, dtype=float)[0, 3] == pytest.approx(50.0)


def test_entropy_chart() -> None:
    fig = viz.entropy_chart(balance_df())
    bar = fig.data[0]
    assert isinstance(bar, go.Bar) and list(bar.x) == ["L1", "L2"]
    assert list(bar.text) == ["1 dead", ""]
    assert fig.layout.shapes and fig.layout.shapes[0].y0 == 1.0  # even-spread line
    assert "Least balanced layer: L1" in viz.finding_of(fig) and "1 dead expert " in viz.finding_of(fig)


def test_specialization_heatmap() -> None:
    df = pd.DataFrame(
        [{"layer": l, "expert": e, "label": lab, "specialization": v, "baseline": 0.5}
         for l in (0, 1) for e in range(4) for lab, v in (("code", 0.9 if e == 1 and l == 1 else 0.4), ("math", 0.3))]
    )
    fig = viz.specialization_heatmap(df)
    hm = fig.data[0]
    assert list(hm.y) == ["code", "math"] and list(hm.x) == ["E0", "E1", "E2", "E3"]
    assert "layer L1" in fig.layout.title.text  # default: the layer with the most specialised expert
    assert "E1 in layer L1 takes 90.0% of 'code' tokens" in viz.finding_of(fig)
    assert "1.8× lift" in viz.finding_of(fig)


def test_repetition_chart_bars_and_baselines() -> None:
    df = pd.DataFrame({"layer": [0, 1], "n_pairs": [10, 10], "first_choice": [0.3, 0.4], "any_overlap": [0.6, 0.7],
                       "uniform_first": [0.125, 0.125], "uniform_overlap": [0.46, 0.46], "sum_sq_first": [0.2, 0.22],
                       "perm_first": [0.19, 0.2], "perm_overlap": [0.5, 0.5]})
    fig = viz.repetition_chart(df)
    assert sum(isinstance(t, go.Bar) for t in fig.data) == 2  # one panel per observed rate
    markers = [t for t in fig.data if isinstance(t, go.Scatter)]
    assert len(markers) == 5  # 3 baselines of the first choice + 2 of the overlap
    assert sorted({t.name for t in markers if t.showlegend}) == [
        "baseline: own load, independent (Σq²)", "baseline: shuffled pairs", "baseline: uniform routing"]
    assert "Layer L1 keeps the same first-choice expert on 40.0%" in viz.finding_of(fig)
    assert "12.5% for uniform routing" in viz.finding_of(fig) and "22.0% for independent draws" in viz.finding_of(fig)
    generic = viz.repetition_chart(pd.DataFrame({"layer": [0], "first": [0.3], "first_uniform": [0.1]}))
    assert [t.name for t in generic.data] == ["observed", "baseline: uniform"]


def test_domain_summary_vocabulary_and_transitions() -> None:
    summ = pd.DataFrame({"layer": [0, 1], "n_labels": [3, 3], "mi_ratio": [0.2, 0.4], "js_bits": [0.1, 0.3],
                         "purity": [0.5, 0.6], "chance_purity": [1 / 3, 1 / 3]})
    fig = viz.domain_summary_chart(summ)
    assert [t.name for t in fig.data] == ["MI(label; top-1) / H(label)", "mean JS divergence between labels (bits)",
                                          "mean expert purity", "chance (mean expert purity)"]
    assert "layer L1: MI(label; top-1) / H(label) = 0.40, expert purity 0.60 vs chance 0.33" in viz.finding_of(fig)
    vs = viz.layer_score_chart(pd.DataFrame({"layer": [0, 1], "score": [0.5, 0.7]}), "score", title="t", what="vocabulary specialization", baseline=0.25)
    assert list(vs.data[0].y) == [0.5, 0.7] and "layer L1 with 0.70; baseline 0.25" in viz.finding_of(vs)
    hm = viz.layer_expert_heatmap(pd.DataFrame({"layer": [0, 0], "expert": [0, 1], "score": [0.2, 0.9]}), "score", title="t", what="score")
    assert np.asarray(hm.data[0].z, dtype=float).shape == (1, 2) and "E1 in layer L0 (0.90)" in viz.finding_of(hm)
    tr = pd.DataFrame({"layer": [0, 0, 1], "next_layer": [1, 1, 2], "expert": [0, 1, 0], "next_expert": [1, 1, 0],
                       "count": [5, 5, 3], "p": [1.0, 1.0, 1.0]})
    fig = viz.transition_heatmap(tr, layer=0)
    assert "layer L0 → L1" in fig.layout.title.text
    assert "Strongest path: E0 in L0 → E1 in L1 (100.0%)" in viz.finding_of(fig)


def test_srp_and_sch_curves() -> None:
    srp = pd.DataFrame({"layer": [0, 0, 1, 1], "m": [4, 16, 4, 16], "srp": [0.6, 0.4, 0.7, 0.5]})
    fig = viz.srp_chart(srp)
    assert [t.name for t in fig.data] == ["L0", "L1"]
    assert fig.layout.xaxis.type == "log"
    assert "layer L1 reaches 0.70 at segment length (tokens) 4, 0.50 at 16" in viz.finding_of(fig)
    sch = pd.DataFrame({"layer": [0] * 6, "policy": ["sch"] * 4 + ["lru"] * 2, "m": [1, 1, 4, 4, -1, -1],
                        "cache_size": [2, 4, 2, 4, 2, 4], "cache_ratio": [1.0, 2.0, 1.0, 2.0, 1.0, 2.0],
                        "hit_rate": [0.5, 0.7, 0.6, 0.8, 0.4, 0.6]})
    fig = viz.sch_chart(sch, lookahead=4)
    assert "lookahead 4" in fig.layout.title.text and len(fig.data) == 2  # SCH solid + LRU dashed
    assert list(fig.data[0].y) == [60.0, 80.0] and fig.data[1].line.dash == "dash"
    assert viz.finding_of(fig) == ("With a cache of 2× the active experts and 4 tokens of lookahead, layer L0 hits 80.0% "
                                   "(LRU: 60.0%).")
    assert "lookahead 1" in viz.sch_chart(sch).layout.title.text


def test_coactivation_heatmap() -> None:
    rows = [{"layer": 0, "expert_i": i, "expert_j": j, "p_j_given_i": 0.8 if (i, j) == (0, 2) else 0.1}
            for i in range(3) for j in range(3) if i != j]
    fig = viz.coactivation_heatmap(pd.DataFrame(rows), baseline=0.5)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isnan(z[0, 0]) and z[0, 2] == pytest.approx(80.0)
    assert "when E0 is picked, E2 is picked too 80.0% of the time (uniform routing: 50.0%)" in viz.finding_of(fig)


def test_committee_npmi_map_agreement_top_tokens() -> None:
    com = pd.DataFrame({"layer": [0, 1], "committee": [[1, 3], [2]], "size": [2, 1], "coverage": [0.45, 0.2], "ratio": [3.1, 1.5]})
    fig = viz.committee_chart(com)
    assert list(fig.data[0].text) == ["E1, E3", "E2"]
    assert "Layer L0 has a standing committee of 2 experts" in viz.finding_of(fig)

    npmi = pd.DataFrame({"layer": [0, 0, 1], "expert": [0, 5, 2], "npmi": [0.1, 0.6, -0.2]})
    fig = viz.npmi_bar(npmi, n=2, what="digits")
    bar = fig.data[0]
    assert list(bar.y) == ["L0 · E0", "L0 · E5"]  # top 2, largest at the top of a horizontal bar chart
    assert list(bar.marker.color) == [viz.expert_color(0, 0), viz.expert_color(5, 0)]
    assert "Most associated with digits: E5 in layer L0" in viz.finding_of(fig)

    emap = pd.DataFrame({"layer": [0, 0, 1], "expert": [0, 1, 0], "x": [0.0, 1.0, 2.0], "y": [1.0, 0.0, 1.0],
                         "dominant_label": ["code", "math", "code"]})
    by_layer = viz.expert_map_scatter(emap)
    assert [t.name for t in by_layer.data] == ["L0", "L1"]
    by_label = viz.expert_map_scatter(emap, color_by="dominant_label")
    assert [t.name for t in by_label.data] == ["code", "math"]
    assert by_label.data[0].marker.color == viz.label_color("code", ["code", "math"])
    assert "'code' dominates 2 of 3" in viz.finding_of(by_label)

    agree = pd.DataFrame({"layer": [0, 1], "n_tokens": [100, 100], "top1_agreement": [0.8, 0.5], "topk_overlap": [0.9, 0.6],
                          "k": [2, 2], "baseline": [0.25, 0.25]})
    fig = viz.agreement_chart(agree)
    assert [t.name for t in fig.data] == ["top-k overlap", "same top-1", "chance, top-k overlap (k/E)",
                                          "chance, same top-1 (1/E)"]
    assert list(fig.data[2].y) == [25.0, 25.0] and list(fig.data[3].y) == [12.5, 12.5]  # k/E and 1/E, E = 8
    assert "agree on 75.0% of top-k choices overall; lowest in layer L1 (60.0%)" in viz.finding_of(fig)

    top = pd.DataFrame({"token": [" the", "\n", " the"], "count": [5, 3, 1]})
    fig = viz.top_tokens_bar(top, layer=2, expert=1)
    assert len(set(fig.data[0].y)) == 3  # equal token texts stay distinct bars
    assert "E1 in layer L2 most often receives ' the'" in viz.finding_of(fig)


def test_empty_frames_give_an_explanatory_figure() -> None:
    for fig in (viz.load_heatmap(pd.DataFrame()), viz.entropy_chart(pd.DataFrame()), viz.npmi_bar(pd.DataFrame()),
                viz.agreement_chart(pd.DataFrame()), viz.committee_chart(pd.DataFrame())):
        assert viz.finding_of(fig)
        assert fig.layout.annotations


def test_figure_html_is_standalone() -> None:
    fig = viz.entropy_chart(balance_df())
    html = viz.figure_html(fig)
    assert html.startswith("<html>") or "<html" in html[:200]
    assert "Least balanced layer" in html
    assert not re.search(r'<script[^>]+src="https?://', html)  # plotly.js inlined: works offline
    assert len(html) > 1_000_000


# -- token view ---------------------------------------------------------------------------------------


def tokens_and_routing(texts: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    toks = pd.DataFrame({"seq_id": 0, "pos": range(len(texts)), "token_id": range(100, 100 + len(texts)), "token": texts,
                         "phase": ["prompt"] * (len(texts) - 1) + ["generated"]})
    rows = []
    for pos in range(len(texts)):
        for layer in (0, 3):
            rows.append({"seq_id": 0, "pos": pos, "layer": layer, "rank": 0, "expert": (pos + layer) % 4, "weight": 0.7})
            rows.append({"seq_id": 0, "pos": pos, "layer": layer, "rank": 1, "expert": -1 if pos == 1 else 5, "weight": 0.3 if pos != 1 else 0.0})
    return toks, pd.DataFrame(rows)


def test_token_html_escapes_and_keeps_multibyte_text_exact() -> None:
    texts = ["<script>alert('x')</script>", " Привет", "日本語🙂", " a&b", "\n", ' "q"']
    toks, routing = tokens_and_routing(texts)
    view = viz.token_html(toks, routing, layer=0)
    html = view.html
    assert "<script>" not in html and "&lt;script&gt;" in html
    for t in (" Привет", "日本語🙂"):
        assert t in html  # exact, not entity-encoded
    assert " a&amp;b" in html
    # every token's text round-trips exactly through the spans
    spans = re.findall(r'<span class="ml-tok[^"]*" data-pos="(\d+)"[^>]*>(.*?)</span>', html, flags=re.S)
    import html as htmllib

    assert [htmllib.unescape(s) for _, s in spans] == texts
    assert view.n_tokens == len(texts) and view._repr_html_() == html
    assert view.to_html().startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in view.to_html()


def test_token_html_colours_tooltips_and_modes() -> None:
    toks, routing = tokens_and_routing(["a", "b", "c"])
    view = viz.token_html(toks, routing, layer=3)
    # top-1 at layer 3 of pos 0 is expert 3: its palette colour is the background
    assert f"background:{viz.expert_color(3, 3)}" in view.html
    # hover text lists every layer with experts and weights; the capacity drop is named
    tip = re.search(r'data-pos="1"[^>]*data-tip="([^"]*)"', view.html).group(1)
    assert "L0  E1 0.70 · dropped 0.00 (not routed)" in tip and "L3  E0 0.70" in tip
    assert "(generated)" in view.html and "ml-gen" in view.html
    assert view.experts_shown == {3: 1, 0: 1, 1: 1}
    w = viz.token_html(toks, routing, layer=0, color_by="weight", expert=0)
    assert "Gate weight of E0 at layer L0" in w.html and "rgba(" in w.html
    hl = viz.token_html(toks, routing, layer=0, highlight={2})
    assert hl.html.count("ml-hl") == 2  # the CSS rule + the one highlighted token
    with pytest.raises(ValueError):
        viz.token_html(toks, routing, color_by="weight")


def test_token_html_controls_surrogates_and_missing_text() -> None:
    toks, routing = tokens_and_routing(["a", "b", "c"])
    toks["token"] = pd.Series(["a\x00b", "\ud800", None], dtype=object)  # lone surrogate: only an object column holds it
    view = viz.token_html(toks, routing, layer=0)
    view.html.encode("utf-8")  # always encodable
    assert "a\u2400b" in view.html and "\ufffd" in view.html and "\u27e8102\u27e9" in view.html


def test_token_html_caps_long_sequences() -> None:
    toks, routing = tokens_and_routing(["x"] * 50)
    view = viz.token_html(toks, routing, layer=0, max_tokens=10)
    assert view.n_shown == 10 and "Showing the first 10 of 50 tokens" in view.html


def test_viz_imports_neither_torch_nor_streamlit() -> None:
    code = "import sys, moelens.viz; bad = [m for m in ('torch', 'streamlit') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_token_html_gate_weights_are_scaled_to_the_data() -> None:
    toks = pd.DataFrame({"pos": [0, 1], "token": ["a", "b"]})
    routing = pd.DataFrame({"pos": [0, 1], "layer": [0, 0], "rank": [0, 0], "expert": [2, 2], "weight": [0.3, 0.15]})
    html = viz.token_html(toks, routing, layer=0, color_by="weight", expert=2).html
    assert "</span> 0.30</div>" in html  # the legend's top is the largest weight shown, not 1
    assert "rgba(" in html and ",1.000)" in html and ",0.500)" in html  # 0.3 -> full colour, 0.15 -> half
