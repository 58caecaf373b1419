"""Pruning: plans (uniform, per-layer, grouped), checkpoints that load with plain transformers and equal the
original model steered with the removed experts disabled (fp32, every architecture pruning applies to), and the
refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from moelens.adapters import find_routers
from moelens.errors import InputError
from moelens.pruning import LayerLayout, plan_from_scores, random_plan
from moelens.pruning.checkpoint import model_layout, write_checkpoint
from moelens.steering import steer
from moelens.tiny import TINY_MODEL_TYPES, tiny_model, tiny_tokenizer

PRUNABLE = [t for t in TINY_MODEL_TYPES if t not in ("jetmoe", "switch_transformers")]
#: DeepSeek-V3 scores a group by its top-2 experts: 2 groups of 4 keep 2 each at keep 0.5.
OVERRIDES = {"deepseek_v3": dict(n_group=2, topk_group=1)}


def _scores(layout: dict[int, LayerLayout], seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame([dict(layer=layer, expert=e, score=rng.random())
                         for layer, lay in layout.items() for e in range(lay.n_experts)])


@pytest.mark.parametrize("model_type", PRUNABLE)
def test_pruned_checkpoint_equals_the_steered_original(tmp_path, model_type: str) -> None:
    model, _ = tiny_model(model_type, **OVERRIDES.get(model_type, {}))
    if model_type == "deepseek_v3":  # exercise the correction bias: a large one on a removed and a kept expert
        for site in find_routers(model).sites:
            site.correction_bias.data[:] = torch.linspace(-1, 3, site.n_experts)
    layout = model_layout(model)
    plan = plan_from_scores(_scores(layout), layout, 0.5)
    write_checkpoint(model, plan, tmp_path, tokenizer=tiny_tokenizer())
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert {s.n_experts for s in find_routers(pruned).sites} == {4}
    assert json.loads((tmp_path / "pruning.json").read_text())["kept"] == {str(k): list(v) for k, v in plan.kept.items()}
    assert (tmp_path / "tokenizer.json").exists() and list(tmp_path.glob("*.safetensors"))
    ids = torch.randint(4, 120, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with steer(model, disable=plan.removed, mode="reroute"):
            steered = model(ids).logits
        torch.testing.assert_close(pruned(ids).logits, steered, rtol=1e-5, atol=1e-6)


def test_plans_uniform_per_layer_and_grouped() -> None:
    layout = {0: LayerLayout(4, 2), 1: LayerLayout(4, 2)}
    scores = pd.DataFrame({"layer": [0] * 4 + [1] * 4, "expert": list(range(4)) * 2,
                           "score": [4.0, 3.0, 2.0, 1.0, 10.0, 0.0, 0.0, 0.0]})
    assert plan_from_scores(scores, layout, 0.75).kept == {0: (0, 1, 2), 1: (0, 1, 2)}  # ties by expert id
    per_layer = plan_from_scores(scores, layout, 0.75, per_layer=True)
    # normalised: layer 0 = .4 .3 .2 .1, layer 1 = 1 0 0 0; each layer keeps top-k = 2 first, then the best .2
    assert per_layer.kept == {0: (0, 1, 2, 3), 1: (0, 1)}
    per_layer = plan_from_scores(scores, layout, 5 / 8, per_layer=True)
    assert per_layer.kept == {0: (0, 1, 2), 1: (0, 1)} and per_layer.removed == [(0, 3), (1, 2), (1, 3)]
    grouped = {0: LayerLayout(8, 2, n_group=2, min_per_group=2)}
    g = plan_from_scores(pd.DataFrame({"layer": 0, "expert": range(8), "score": [9, 8, 7, 6, 1, 2, 3, 4]}), grouped, 0.5)
    assert g.kept == {0: (0, 1, 6, 7)}  # two per group of four, not the four best overall
    assert random_plan(grouped, g.counts, seed=3).counts == {0: 4}
    with pytest.raises(InputError, match="fewer than its top-k"):
        plan_from_scores(scores, layout, 0.25)
    with pytest.raises(InputError, match="multiple of 2"):
        plan_from_scores(pd.DataFrame({"layer": 0, "expert": range(8), "score": 1.0}), grouped, 5 / 8)


def test_refusals(tmp_path) -> None:
    model, _ = tiny_model("olmoe")
    layout = model_layout(model)
    flat_and_peaked = pd.DataFrame({"layer": [0] * 8 + [1] * 8, "expert": list(range(8)) * 2,
                                    "score": [1.0] * 8 + [100.0] + [0.01] * 7})
    uneven = plan_from_scores(flat_and_peaked, layout, 5 / 8, per_layer=True)
    assert uneven.counts == {0: 8, 1: 2}
    with pytest.raises(InputError, match="cannot express"):
        write_checkpoint(model, uneven, tmp_path)
    jet, _ = tiny_model("jetmoe")
    with pytest.raises(InputError, match="not supported for 'jetmoe'"):
        model_layout(jet)


def test_prune_api_checks_the_run_model_and_writes(tmp_path, store) -> None:
    import moelens
    from moelens.recording.record import record

    model, _ = tiny_model("qwen3_moe")
    tok = tiny_tokenizer()
    run = record(model, tok, ["def f(x): return x", "the cat sat on the mat"], store=store, contributions=True,
                 progress=False)
    plan = moelens.prune(model, store, run, score="reap", keep=0.5, out=tmp_path / "pruned", tokenizer=tok)
    assert plan.counts == {0: 4, 1: 4} and plan.score == "reap"
    assert json.loads((tmp_path / "pruned" / "pruning.json").read_text())["run"] == run
    other, _ = tiny_model("qwen3_moe", seed=1)  # same architecture, other weights
    with pytest.raises(InputError, match="recorded from"):
        moelens.prune(other, store, run, score="reap")
    with pytest.raises(InputError, match="score must be one of"):
        moelens.prune(model, store, run, score="npmi")


def test_evaluate_pruning_against_random_controls(store) -> None:
    from moelens.pruning import evaluate_pruning
    from moelens.pruning.evaluate import markdown_table
    from moelens.recording.record import record

    model, _ = tiny_model("olmoe")
    tok = tiny_tokenizer()
    calibration = [{"text": "def f(x): return x + 1", "label": "code"}, {"text": "the cat sat on the mat", "label": "prose"}]
    held_out = [{"text": "def g(y): return y * 2", "label": "code"}, {"text": "a dog ran in the park", "label": "prose"}]
    run = record(model, tok, calibration, store=store, contributions=True, progress=False)
    seen = []
    result = evaluate_pruning(model, tok, store, run, held_out, scores=("reap", "frequency"), keep=(0.75, 0.5),
                              n_random=3, progress=lambda f, text: seen.append(f))
    assert seen[-1] == 1.0
    assert set(result["method"]) == {"reap", "frequency", "random"} and set(result["label"]) == {"code", "prose", "all"}
    random = result[(result["method"] == "random") & (result["label"] == "all")]
    assert random["std"].notna().all() and result.loc[result["method"] != "random", "std"].isna().all()
    with torch.no_grad():  # the reported loss of one plan equals a direct steered computation
        ids = torch.tensor([tok(held_out[0]["text"])["input_ids"]])
        layout = model_layout(model)
        from moelens.analysis.importance import reap

        plan = plan_from_scores(reap(store, run), layout, 0.5)
        with steer(model, disable=plan.removed, mode="reroute"):
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])
    got = result.query("keep == 0.5 and method == 'reap' and label == 'code'")["loss"].iloc[0]
    assert got == pytest.approx(-float(logp.mean()), rel=1e-5)
    table = markdown_table(result, 0.5)
    assert table.splitlines()[0] == "| keep 50% | code | prose | all |" and "± " in table
