"""Routing-strategy sweeps: `sweep_routing` on tiny models, its loss-vs-compute figure, and the Steer page section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from moelens.errors import SteeringError
from moelens.steering.sweep import sweep_routing
from moelens.tiny import tiny_model, tiny_tokenizer
from moelens.viz.strategies import strategy_curves

APP = Path(__file__).resolve().parents[1] / "app"
DOCS = [{"text": "the quick brown fox jumps over the lazy dog", "label": "en"},
        {"text": "12 + 7 = 19 and 45 - 8 = 37", "label": "math"}]


def test_sweep_reports_loss_and_compute_per_label() -> None:
    model = tiny_model("mixtral")[0]
    sweep = sweep_routing(model, tiny_tokenizer(), DOCS, top_k=[1, 2, 8], top_p=[0.5, 1.0])
    assert set(sweep["variant"]) == {"native", "top_k=1", "top_k=2", "top_k=8", "top_p=0.5", "top_p=1"}
    assert set(sweep["label"]) == {"en", "math", "all"}
    pooled = sweep[sweep["label"] == "all"].set_index("variant")
    assert pooled.loc["top_k=1", "experts_per_token"] == 1.0 and pooled.loc["top_k=8", "experts_per_token"] == 8.0
    assert pooled.loc["top_p=1", "experts_per_token"] == 8.0  # p = 1 routes every expert
    assert 1.0 <= pooled.loc["top_p=0.5", "experts_per_token"] <= 8.0
    # the model's own k is the baseline itself: bitwise the same loss, zero KL
    assert pooled.loc["top_k=2", "loss"] == pooled.loc["native", "loss"] and pooled.loc["top_k=2", "kl"] == 0.0
    assert pooled.loc["top_k=1", "kl"] > 0 and (sweep["loss_base"] == sweep["loss"] - sweep["delta_loss"]).all()
    n_en, n_math = (sweep[(sweep["variant"] == "native") & (sweep["label"] == lab)]["n_tokens"].item() for lab in ("en", "math"))
    assert pooled.loc["native", "n_tokens"] == n_en + n_math
    with pytest.raises(SteeringError, match="sparsemixer"):
        sweep_routing(tiny_model("phimoe")[0], tiny_tokenizer(), DOCS, top_k=[1])

    fig = strategy_curves(sweep)
    names = [t.name for t in fig.data]
    assert names == ["all · top-k", "all · top-p", "all · model as trained"]
    assert list(fig.data[0].x) == sorted(fig.data[0].x) and fig.layout.meta["finding"]
    by_label = strategy_curves(sweep, labels=["en", "math"])
    assert len(by_label.data) == 6


def run_page(db: Path, state: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP / "pages" / "10_Steer.py"), default_timeout=120)
    at.session_state["moelens_db"] = str(db)
    for k, v in (state or {}).items():
        at.session_state[k] = v
    at.run()
    return at


def test_steer_page_section(tmp_path) -> None:
    import sys

    sys.path.insert(0, str(APP))
    from workbench.strategies_section import _documents, example_sweep

    assert _documents("en: hello there\n\nplain text") == [{"text": "hello there", "label": "en"},
                                                          {"text": "plain text", "label": None}]
    at = run_page(tmp_path / "t.duckdb", {"strat_sweep": example_sweep()})
    assert not at.exception and not at.error
    specs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    assert any("experts per token" in json.dumps(s["layout"].get("xaxis", {})) for s in specs)
    assert at.button(key="strat_go").disabled  # no model loaded

    model, tok = tiny_model("olmoe")[0], tiny_tokenizer()
    folder = tmp_path / "tiny-olmoe"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    at = run_page(tmp_path / "page.duckdb")
    at.radio(key="steer_source").set_value("local folder or hub id").run()
    at.text_input(key="steer_path").input(str(folder)).run()
    at.button(key="steer_load").click().run(timeout=300)
    at.text_input(key="strat_k").input("1,2").run()
    at.text_input(key="strat_p").input("0.5").run()
    at.button(key="strat_go").click().run(timeout=300)
    assert not at.exception and not at.error, [e.value for e in at.exception]
    sweep = at.session_state["strat_sweep"]
    assert set(sweep["variant"]) == {"native", "top_k=1", "top_k=2", "top_p=0.5"}
    assert any("experts per token" in json.dumps(json.loads(el.proto.spec)["layout"]) for el in at.get("plotly_chart"))
