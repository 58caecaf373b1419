"""Experts-per-token steering on every tiny architecture: top-k with another k, and dynamic top-p routing.

Each router's re-implementation (`moelens.adapters.routing.route`) is checked against the model's own routing at
its native k; steered routing is then checked against it, against toy logits worked out by hand, and for bitwise
identity where nothing should change. Slots count as routed only when they are not padding (`padding_slots`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch

from moelens import TraceStore
from moelens.adapters import RoutingCapture, find_routers
from moelens.analysis.experts_per_token import experts_per_token
from moelens.adapters.routing import SOFTMAX, SIGMOID_BIAS, TOPK_SIGMOID, TOPK_SOFTMAX, RoutingRule, padding_slots, route
from moelens.errors import SteeringError
from moelens.recording.record import record
from moelens.steering import SteeringSpec, steer
from moelens.tiny import TINY_MODEL_TYPES, tiny_model, tiny_tokenizer

FIXED = {"phimoe": "sparsemixer", "switch_transformers": "capacity"}
ROUTABLE = [t for t in TINY_MODEL_TYPES if t not in FIXED]


@functools.cache
def model_for(model_type: str) -> Any:
    model = tiny_model(model_type)[0]
    for site in find_routers(model).sites:  # a non-zero correction bias exercises biased selection
        if site.correction_bias is not None:
            with torch.no_grad():
                site.correction_bias.copy_(torch.linspace(-0.05, 0.05, site.correction_bias.numel()).view_as(site.correction_bias))
    return model


def token_ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return (torch.randperm(125, generator=torch.Generator().manual_seed(3))[: batch * seq] + 3).view(batch, seq)


def run(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, Any]]:
    info = find_routers(model)  # inside a context: sees the steered k
    with torch.inference_mode(), RoutingCapture(model, info, logits=True) as capture:
        kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
        logits = model(input_ids=ids, **kwargs).logits
        return logits, {call.layer: call for call in capture.pop()}


def n_routed(call: Any) -> torch.Tensor:
    return (~padding_slots(call.experts, call.weights)).sum(1)


def as_sets(experts: torch.Tensor, weights: torch.Tensor) -> list[dict[int, float]]:
    """Per token {expert: weight} of the routed slots (padding dropped)."""
    keep = ~padding_slots(experts, weights)
    return [{int(e): float(w) for e, w, k in zip(er, wr, kr) if k} for er, wr, kr in zip(experts, weights, keep)]


def same_routing(a: list[dict[int, float]], b: list[dict[int, float]]) -> bool:
    return all(x.keys() == y.keys() and all(math.isclose(x[e], y[e], rel_tol=1e-5, abs_tol=1e-6) for e in x)
               for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("model_type", ROUTABLE)
def test_reimplementation_equals_the_models_own_routing(model_type: str) -> None:
    model = model_for(model_type)
    _, calls = run(model, token_ids())
    for site in find_routers(model).sites:
        if site.rule is None:
            continue
        call = calls[site.layer]
        weights, experts = route(call.logits, site.rule, k=site.top_k, bias=site.correction_bias)
        assert same_routing(as_sets(experts, weights), as_sets(call.experts, call.weights)), site.name


@pytest.mark.parametrize("model_type", ROUTABLE)
def test_top_k_override_on_every_architecture(model_type: str) -> None:
    model = model_for(model_type)
    ids = token_ids()
    base, base_calls = run(model, ids)
    native = {s.layer: s.top_k for s in find_routers(model).sites if s.fixed_k is None}
    with steer(model, SteeringSpec()):
        assert torch.equal(run(model, ids)[0], base)
    with steer(model, top_k=native):  # the native k, explicitly: bitwise the same
        same, _ = run(model, ids)
    assert torch.equal(same, base)
    for k in (1, 3):
        with steer(model, top_k=k):
            logits, calls = run(model, ids)
            sites = find_routers(model).sites
        assert not torch.isnan(logits).any()
        for site in sites:
            call = calls[site.layer]
            if site.fixed_k:  # an every-layer k leaves JetMoE's attention experts alone
                assert torch.equal(call.experts, base_calls[site.layer].experts)
                continue
            assert site.top_k == k and bool((n_routed(call) == k).all())
            assert len({tuple(sorted(row)) for row in call.experts.tolist()}) > 1
            weights, experts = route(call.logits, site.rule, k=k, bias=site.correction_bias)
            assert same_routing(as_sets(call.experts, call.weights), as_sets(experts, weights)), (site.name, k)
    assert [s.top_k for s in find_routers(model).sites if s.fixed_k is None] == list(native.values())


@pytest.mark.parametrize("model_type", ROUTABLE)
def test_top_p_on_every_architecture(model_type: str) -> None:
    model = model_for(model_type)
    ids = token_ids()
    base, _ = run(model, ids)
    with steer(model, top_p=1.0, k_max=64):  # every expert (k_max is capped at E)
        _, everything = run(model, ids)
    with steer(model, top_p=0.5, k_max=5) as spec:
        logits, calls = run(model, ids)
    assert spec.top_p == ((-1, 0.5),) and not torch.isnan(logits).any()
    for site in find_routers(model).sites:
        if site.fixed_k:
            continue
        call = calls[site.layer]
        counts = n_routed(call)
        assert call.experts.shape[1] == 5 and bool(((counts >= 1) & (counts <= 5)).all())
        weights, experts = route(call.logits, site.rule, top_p=0.5, k_max=5, bias=site.correction_bias)
        assert same_routing(as_sets(call.experts, call.weights), as_sets(experts, weights)), site.name
        allowed = site.n_experts if site.rule.n_group <= 1 else site.n_experts * site.rule.topk_group // site.rule.n_group
        assert bool((n_routed(everything[site.layer]) == allowed).all()), site.name
    with steer(model, top_p=0.5), steer(model, top_k=2):  # the inner setting wins, and both unwind
        _, inner = run(model, ids)
    assert all(bool((n_routed(inner[s.layer]) == 2).all()) for s in find_routers(model).sites if not s.fixed_k)
    assert torch.equal(run(model, ids)[0], base)


@pytest.mark.parametrize("model_type", FIXED)
def test_fixed_k_architectures_are_refused(model_type: str) -> None:
    model = model_for(model_type)
    layer = find_routers(model).sites[0].layer
    for kwargs in (dict(top_k=3), dict(top_k={layer: 1}), dict(top_p=0.5)):
        with pytest.raises(SteeringError, match=FIXED[model_type]):
            with steer(model, **kwargs):
                pass


def test_jetmoe_attention_experts_are_refused_by_layer() -> None:
    model = model_for("jetmoe")
    attention = next(s.layer for s in find_routers(model).sites if s.kind == "attention")
    with pytest.raises(SteeringError, match="attention heads"):
        with steer(model, top_k={attention: 3}):
            pass


def toy_logits() -> torch.Tensor:
    """Two tokens over 4 experts with softmax probabilities (0.5, 0.3, 0.15, 0.05) and (0.05, 0.15, 0.3, 0.5)."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    return probs.log()


@pytest.mark.parametrize(("p", "expected"), [(0.4, [1, 1]), (0.5, [1, 1]), (0.6, [2, 2]), (0.85, [3, 3]), (0.99, [4, 4])])
def test_top_p_counts_by_hand(p: float, expected: list[int]) -> None:
    weights, experts = route(toy_logits(), RoutingRule(SOFTMAX, renormalise=True), top_p=p)
    counts = (~padding_slots(experts, weights)).sum(1).tolist()
    assert counts == expected
    assert experts[0, : expected[0]].tolist() == [0, 1, 2, 3][: expected[0]]
    assert experts[1, : expected[1]].tolist() == [3, 2, 1, 0][: expected[1]]


def test_top_p_weights_by_hand_for_each_normalisation() -> None:
    z = toy_logits()[:1]  # p = (0.5, 0.3, 0.15, 0.05); top_p = 0.6 chooses experts 0 and 1
    cases = {
        "mixtral (renormalise)": (RoutingRule(SOFTMAX, renormalise=True), [0.5 / 0.8, 0.3 / 0.8]),
        "qwen, norm_topk_prob=False": (RoutingRule(SOFTMAX), [0.5, 0.3]),
        "deepseek-v2 x2.5": (RoutingRule(SOFTMAX, scale=2.5), [1.25, 0.75]),
        "gpt-oss (softmax of the chosen logits)": (RoutingRule(TOPK_SOFTMAX), [0.5 / 0.8, 0.3 / 0.8]),
        "llama4 (sigmoid of the chosen logits)": (RoutingRule(TOPK_SIGMOID), [1 / (1 + 1 / 0.5), 1 / (1 + 1 / 0.3)]),
    }
    for name, (rule, expected) in cases.items():
        weights, experts = route(z, rule, top_p=0.6)
        assert experts[0, :2].tolist() == [0, 1], name
        assert weights[0, :2].tolist() == pytest.approx(expected, rel=1e-6), name
        assert weights[0, 2:].tolist() == [0.0, 0.0] and experts[0, 2:].tolist() == [0, 0], name


def test_sigmoid_bias_top_p_by_hand() -> None:
    """DeepSeek-V3: order by sigmoid + bias, mass from the normalised un-biased sigmoid, weights renormalised x 2.5."""
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = torch.sigmoid(z)[0]
    bias = torch.tensor([0.0, 0.0, 0.0, 1.0])  # expert 3 ranks first
    rule = RoutingRule(SIGMOID_BIAS, renormalise=True, scale=2.5)
    weights, experts = route(z, rule, top_p=0.3, bias=bias)
    mass3 = float(s[3] / s.sum())  # 0.12 < 0.3, then expert 0 (0.39) reaches it
    assert mass3 < 0.3 < mass3 + float(s[0] / s.sum())
    assert experts[0, :2].tolist() == [3, 0] and int((~padding_slots(experts, weights)).sum()) == 2
    assert weights[0, :2].tolist() == pytest.approx([2.5 * float(s[3] / (s[3] + s[0])), 2.5 * float(s[0] / (s[3] + s[0]))])


def test_spec_forms_and_refusals() -> None:
    spec = SteeringSpec(top_p={0: 0.4}, k_max=3)
    assert spec.experts_per_token(0) == ("p", 0.4, 3) and spec.experts_per_token(1) is None
    assert SteeringSpec.from_json(spec.to_json()) == spec
    assert SteeringSpec.from_dict({"top_k": 2}) == SteeringSpec(top_k=2) == SteeringSpec(top_k={-1: 2})
    assert SteeringSpec(top_k=2, top_p={1: 0.5}).experts_per_token(1) == ("p", 0.5, None)
    assert SteeringSpec(top_p=0.5).describe() == "top_p 0.5" and not SteeringSpec(top_p=0.5).is_empty
    for kwargs, message in [(dict(top_p=0.0), r"\(0, 1\]"), (dict(top_p=1.5), r"\(0, 1\]"), (dict(k_max=2), "caps top_p"),
                            (dict(top_k=2, top_p=0.5), "not both"), (dict(top_p="x"), "number")]:
        with pytest.raises(SteeringError, match=message):
            SteeringSpec(**kwargs)
    with pytest.raises(SteeringError, match="no MoE router"):
        with steer(model_for("mixtral"), top_p={7: 0.5}):
            pass


@pytest.fixture(scope="module")
def strategies_store(tmp_path_factory) -> TraceStore:
    return TraceStore(tmp_path_factory.mktemp("strategies") / "t.duckdb")


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "llama4_text", "dbrx", "jetmoe"])
def test_recorded_runs_store_k_slots_and_variable_top_p_slots(model_type: str, strategies_store: TraceStore) -> None:
    model = model_for(model_type)
    texts = ["the quick brown fox", "2 + 2 = 4"]
    counts = "SELECT layer, seq_id, pos, count(*) AS n, max(rank) AS top_rank FROM routing WHERE run_id = ? GROUP BY ALL"
    with steer(model, top_k=3) as spec:
        run_k = record(model, tiny_tokenizer(), texts, store=strategies_store, intervention=spec.to_dict(), progress=False)
    fixed = {s.layer for s in find_routers(model).sites if s.fixed_k}
    rows = strategies_store.query(counts, [run_k])
    assert set(rows.loc[~rows["layer"].isin(fixed), "n"]) == {3}
    layers = strategies_store.query("SELECT layer, top_k FROM layers WHERE run_id = ?", [run_k])
    assert set(layers.loc[~layers["layer"].isin(fixed), "top_k"]) == {3}
    with steer(model, top_p=0.3, k_max=4) as spec:  # generation too: every KV-cached step is re-routed
        run_p = record(model, tiny_tokenizer(), texts, store=strategies_store, intervention=spec.to_dict(),
                       generate=3, progress=False)
    rows = strategies_store.query(counts, [run_p])
    moe = rows[~rows["layer"].isin(fixed)]
    assert moe["n"].between(1, 4).all() and (moe["top_rank"] == moe["n"] - 1).all()
    tokens = strategies_store.query("SELECT count(*) AS n FROM tokens WHERE run_id = ?", [run_p])["n"][0]
    assert len(moe) == tokens * (len(find_routers(model).sites) - len(fixed))  # every token has its rank-0 row
    assert strategies_store.run(run_p)["intervention"]["top_p"] == [[-1, 0.3]]
    per_token = experts_per_token(strategies_store, run_p)  # the analysis reads the variable ranks back
    means = per_token.groupby("layer")["mean_experts"].first()
    assert means.to_dict() == pytest.approx(rows.groupby("layer")["n"].mean().to_dict())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss", "mixtral"])
def test_bf16_models_keep_their_weight_dtype(model_type: str) -> None:
    model = tiny_model(model_type, dtype=torch.bfloat16)[0]
    ids = token_ids()
    experts = find_routers(model).sites[0].experts
    received: list[torch.dtype] = []
    handle = experts.register_forward_pre_hook(lambda module, args: received.append(args[2].dtype))
    base, base_calls = run(model, ids)
    with steer(model, top_p=0.6, k_max=4):
        logits, calls = run(model, ids)
    handle.remove()
    assert received[0] == received[-1], received  # the experts get the weights in the model's own dtype
    assert not torch.isnan(logits).any()
    for layer, call in calls.items():
        assert call.experts.shape[1] == 4 and bool((n_routed(call) >= 1).all())
    with steer(model, top_k=2):  # the native k in bf16 too: bitwise the same
        assert torch.equal(run(model, ids)[0], base)


def test_per_layer_values_override_the_every_layer_one() -> None:
    model = model_for("mixtral")
    with steer(model, top_k={0: 1, -1: 4}, top_p={1: 0.3}):  # layer 0: k=1; layer 1: top-p (overrides k=4)
        _, calls = run(model, token_ids())
    assert bool((n_routed(calls[0]) == 1).all()) and calls[1].experts.shape[1] == 8
    with steer(model, top_k={1: 3}):
        _, calls = run(model, token_ids())
    assert calls[0].experts.shape[1] == 2 and calls[1].experts.shape[1] == 3
