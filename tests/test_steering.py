"""Steering on every tiny architecture: disable, force, zero-ablation, gate scale, top-k, nesting and exact restore.

Routing is read with the adapters' `RoutingCapture` (what `record` stores) and, for gate scales, with a pre-hook on
the experts module (what the experts actually receive). A slot counts as routed only with a non-zero weight and an
expert id >= 0.
"""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd
import pytest
import torch

from moelens import TraceStore
from moelens.adapters import MoEInfo, RoutingCapture, find_routers
from moelens.errors import SteeringError
from moelens.recording.record import record
from moelens.steering import SteeringSpec, calibrate_logit_std, steer
from moelens.steering.context import active_spec_count
from moelens.tiny import TINY_MODEL_TYPES, tiny_model, tiny_tokenizer

CAUSAL = [t for t in TINY_MODEL_TYPES if t != "switch_transformers"]
BIASED = ["deepseek_v3", "glm4_moe", "ernie4_5_moe"]  # routers with an e_score_correction_bias


@functools.cache
def model_for(model_type: str) -> Any:
    return tiny_model(model_type)[0]


def token_ids(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return (torch.randperm(125, generator=torch.Generator().manual_seed(seed))[: batch * seq] + 3).view(batch, seq)


def run(model: Any, ids: torch.Tensor, info: MoEInfo | None = None) -> tuple[torch.Tensor, dict[int, Any]]:
    """Logits and ``{layer: RouterCall}`` of one forward."""
    info = info or find_routers(model)
    with torch.inference_mode(), RoutingCapture(model, info) as capture:
        kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
        logits = model(input_ids=ids, **kwargs).logits
        calls = {call.layer: call for call in capture.pop()}
    return logits, calls


def routed(call: Any, expert: int) -> torch.Tensor:
    """bool[T]: the token routes to ``expert`` (non-zero weight, not dropped)."""
    return ((call.experts == expert) & (call.weights != 0)).any(dim=1)


def most_used(call: Any) -> int:
    return int(torch.bincount(call.experts[call.experts >= 0].flatten()).argmax())


def hook_count(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_disable_force_zero_and_exact_restore(model_type: str) -> None:
    model = model_for(model_type)
    info = find_routers(model)
    ids = token_ids()
    base, calls = run(model, ids, info)
    hooks = hook_count(model)
    disabled = {layer: most_used(call) for layer, call in calls.items()}
    forced = {layer: (e + 1) % info.site(layer).n_experts for layer, e in disabled.items()}

    with steer(model):  # empty spec: no hook, bitwise the same
        assert hook_count(model) == hooks
        assert torch.equal(run(model, ids, info)[0], base)

    for mode in ("reroute", "zero"):
        with steer(model, disable=disabled.items(), mode=mode):
            logits, steered = run(model, ids, info)
        assert not torch.isnan(logits).any()
        assert not torch.equal(logits, base)
        for layer, expert in disabled.items():
            assert routed(calls[layer], expert).any()
            assert not routed(steered[layer], expert).any(), (mode, layer)

    with steer(model, force=forced.items()):
        logits, steered = run(model, ids, info)
    assert not torch.isnan(logits).any()
    for layer, expert in forced.items():
        assert routed(steered[layer], expert).all(), layer

    assert hook_count(model) == hooks
    assert torch.equal(run(model, ids, info)[0], base)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_gate_scale_multiplies_the_weights_the_experts_receive(model_type: str) -> None:
    model = model_for(model_type)
    info = find_routers(model)
    ids = token_ids()
    received: dict[int, list[tuple]] = {}
    handles = [
        site.experts.register_forward_pre_hook(lambda m, args, layer=site.layer: received.setdefault(layer, []).append(args))
        for site in info.sites
    ]
    try:
        _, base = run(model, ids, info)
        base_inputs = {layer: args[0] for layer, args in received.items()}
        received.clear()
        site = info.sites[-1]
        beta = {1: 4.0, 2: 0.5}
        with steer(model, gate_scale={(site.layer, e): b for e, b in beta.items()}):
            _, steered = run(model, ids, info)
        steered_inputs = {layer: args[0] for layer, args in received.items()}
    finally:
        for handle in handles:
            handle.remove()

    scale = torch.ones(site.n_experts)
    for e, b in beta.items():
        scale[e] = b
    before, after = base[site.layer], steered[site.layer]
    assert torch.equal(after.experts, before.experts)  # selection unchanged
    assert torch.equal(after.weights, before.weights * scale[before.experts.clamp(min=0)])
    if site.family in ("standard", "dbrx"):  # the experts module's own (hidden, index, weights) inputs
        _, idx, w = base_inputs[site.layer][:3]
        assert torch.equal(steered_inputs[site.layer][2], w * scale[idx])


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> TraceStore:
    """One store for the file: creating the schema costs more than a tiny model's run."""
    return TraceStore(tmp_path_factory.mktemp("steering") / "t.duckdb")


@pytest.mark.parametrize("model_type", CAUSAL)
def test_generate_is_steered_at_every_step(model_type: str) -> None:
    """Every router call of a KV-cached generate (the prompt, then one token per step) avoids the disabled experts."""
    model = model_for(model_type)
    info = find_routers(model)
    prompt = token_ids(1, 8)
    _, calls = run(model, prompt, info)
    disabled = {layer: most_used(call) for layer, call in calls.items()}
    with torch.inference_mode(), steer(model, disable=disabled.items()), RoutingCapture(model, info) as capture:
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0)
        steps = capture.pop()
    for layer, expert in disabled.items():
        per_layer = [call for call in steps if call.layer == layer]
        assert [call.experts.shape[0] for call in per_layer] == [8, 1, 1, 1, 1]
        assert not any(routed(call, expert).any() for call in per_layer)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "jetmoe", "llama4_text"])
def test_recorded_generation_has_no_disabled_expert(model_type: str, shared_store: TraceStore) -> None:
    """The same through `record(generate=...)` into a store: no stored slot routes a disabled expert."""
    model = model_for(model_type)
    _, calls = run(model, token_ids(1, 8))
    disabled = [(layer, most_used(call)) for layer, call in calls.items()]
    with steer(model, disable=disabled) as spec:
        run_id = record(model, tiny_tokenizer(), ["the quick brown fox", "2 + 2 = "], store=shared_store, generate=5,
                        intervention=spec.to_dict(), progress=False)
    rows = shared_store.query(
        "SELECT r.layer, r.expert, r.weight, t.phase FROM routing r JOIN tokens t USING (run_id, seq_id, pos) "
        "WHERE r.run_id = ?", [run_id]
    )
    assert (rows["phase"] == "generated").sum() > 0
    hits = rows[rows["weight"] != 0].merge(pd.DataFrame(disabled, columns=["layer", "expert"]), on=["layer", "expert"])
    assert hits.empty
    assert shared_store.run(run_id)["intervention"] is not None


def test_switch_forced_within_capacity_and_disable_recorded(shared_store: TraceStore) -> None:
    model = model_for("switch_transformers")  # the recipe's expert_capacity=64 holds every token of a sequence
    assert model.config.expert_capacity == 64
    info = find_routers(model)
    store = shared_store
    with steer(model, force=[(site.layer, 3) for site in info.sites]):
        run_id = record(model, tiny_tokenizer(), ["x" * 30, "y" * 20], store=store, progress=False)
    rows = store.query("SELECT layer, expert FROM routing WHERE run_id = ?", [run_id])
    assert (rows["expert"] == 3).all()
    with steer(model, disable=[(site.layer, 3) for site in info.sites]):
        run_id = record(model, tiny_tokenizer(), ["x" * 30, "y" * 20], store=store, progress=False)
    assert not (store.query("SELECT expert FROM routing WHERE run_id = ?", [run_id])["expert"] == 3).any()


@pytest.mark.parametrize("model_type", BIASED)
def test_correction_bias_cannot_keep_a_disabled_expert(model_type: str) -> None:
    model = tiny_model(model_type)[0]
    info = find_routers(model)
    site = info.sites[0]
    with torch.no_grad():
        site.correction_bias[..., 5] = 3.0
    saved = site.correction_bias.detach().clone()
    ids = token_ids()
    base, calls = run(model, ids, info)
    assert (calls[site.layer].experts == 5).any(dim=1).all()  # the bias wins every token
    with steer(model, disable=[(site.layer, 5)]):
        _, steered = run(model, ids, info)
        assert torch.isneginf(site.correction_bias[..., 5]).all()
    assert not (steered[site.layer].experts == 5).any()  # not even as a weight-0 slot
    assert torch.equal(site.correction_bias, saved)
    assert torch.equal(run(model, ids, info)[0], base)
    with steer(model, force=[(site.layer, 2)]):  # a force also beats another expert's large bias
        assert routed(run(model, ids, info)[1][site.layer], 2).all()
    assert torch.equal(site.correction_bias, saved)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_bf16_models(model_type: str) -> None:
    """bf16 weights (DeepSeek-V3 casts its router weight to fp32: the logit op is found by shape)."""
    model = tiny_model(model_type, dtype=torch.bfloat16)[0]
    ids = token_ids()
    base, calls = run(model, ids)
    e = most_used(calls[0])
    with steer(model, disable=[(0, e)], force=[(1, 3)]):
        logits, steered = run(model, ids)
    assert not torch.isnan(logits).any()
    assert not routed(steered[0], e).any() and routed(steered[1], 3).all()
    assert torch.equal(run(model, ids)[0], base)


def test_nesting_composes_and_unwinds() -> None:
    model = model_for("mixtral")
    ids = token_ids()
    base, calls = run(model, ids)
    a, b = most_used(calls[0]), (most_used(calls[0]) + 1) % 8
    with steer(model, disable=[(0, a)]):
        outer, _ = run(model, ids)
        with steer(model, disable=[(0, b)], boost={(1, 4): 1.0}):
            _, inner = run(model, ids)
            assert not (routed(inner[0], a) | routed(inner[0], b)).any()
            assert active_spec_count(model) == 2
        assert torch.equal(run(model, ids)[0], outer)
    assert torch.equal(run(model, ids)[0], base)
    assert active_spec_count(model) == 0

    with steer(model, boost={(1, 4): 1.0}), steer(model, boost={(1, 4): 1.0}):
        twice, _ = run(model, ids)
    with steer(model, boost={(1, 4): 2.0}):
        assert torch.equal(run(model, ids)[0], twice)  # offsets add


def test_restored_after_an_exception() -> None:
    model = tiny_model("deepseek_v3")[0]
    info = find_routers(model)
    ids = token_ids()
    base, _ = run(model, ids, info)
    hooks = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, disable=[(0, 1)], gate_scale={(1, 2): 3.0}, top_k={1: 3}):
            run(model, ids, info)
            raise RuntimeError("boom")
    assert hook_count(model) == hooks and info.site(1).module.top_k == 2
    assert torch.equal(run(model, ids, info)[0], base)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_top_k_where_the_router_reads_it(model_type: str) -> None:
    model = model_for(model_type)
    site = find_routers(model).sites[0]
    if model_type in ("phimoe", "switch_transformers"):
        with pytest.raises(SteeringError, match="cannot change top_k"):
            with steer(model, top_k={site.layer: 1}):
                pass
        return
    with steer(model, top_k={site.layer: 3}):
        _, calls = run(model, token_ids())  # discovery inside the context sees the new k
    assert calls[site.layer].experts.shape[1] == 3
    assert find_routers(model).sites[0].top_k == site.top_k


def test_boost_in_std_units_needs_calibration() -> None:
    model = model_for("olmoe")
    ids = token_ids()
    stds = calibrate_logit_std(model, ids)
    assert set(stds) == {0, 1} and all(s > 0 for s in stds.values())
    with pytest.raises(SteeringError, match="calibrate"):
        with steer(model, boost={(0, 3): 3.0}, boost_unit="std"):
            pass
    _, base = run(model, ids)
    with steer(model, boost={(0, 3): 3.0}, boost_unit="std", calibration=ids) as spec:
        _, boosted = run(model, ids)
    assert dict(spec.logit_std) == stds
    assert routed(boosted[0], 3).float().mean() > routed(base[0], 3).float().mean()
    with steer(model, boost={(0, 3): 3.0 * stds[0]}):  # the same offset in logits
        assert torch.equal(run(model, ids)[1][0].experts, boosted[0].experts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(disable=[(7, 0)]), "layer 7 has no MoE router"),
        (dict(disable=[(0, 8)]), "no expert 8"),
        (dict(force=[(0, 1), (0, 2), (0, 3)]), "cannot force 3"),
        (dict(disable=[(0, e) for e in range(8)]), "every expert of layer 0"),
        (dict(disable=[(0, 1)], force=[(0, 1)]), "both disabled and forced"),
        (dict(top_k={0: 9}), "between 1 and 8"),
        (dict(mode="nope"), "mode must be"),
        (dict(bogus=1), "unknown steering arguments"),
    ],
)
def test_invalid_specs_are_refused_and_change_nothing(kwargs: dict, message: str) -> None:
    model = model_for("mixtral")
    hooks = hook_count(model)
    with pytest.raises(SteeringError, match=message):
        with steer(model, **kwargs):
            pass
    assert hook_count(model) == hooks and active_spec_count(model) == 0


def test_nested_conflict_is_refused_without_touching_the_outer_context() -> None:
    model = model_for("mixtral")
    ids = token_ids()
    with steer(model, force=[(0, 1), (0, 2)]):
        outer, _ = run(model, ids)
        with pytest.raises(SteeringError, match="cannot force 3"):
            with steer(model, force=[(0, 3)]):
                pass
        assert torch.equal(run(model, ids)[0], outer)


def test_spec_json_round_trip_and_forms() -> None:
    spec = SteeringSpec(disable=[(2, 5), (1, 3), (1, 3)], force=["0:7"], boost={(1, 2): -1.5}, gate_scale={"3:4": 64},
                        top_k={1: 4}, mode="zero", boost_unit="std", logit_std={1: 0.25})
    assert spec.disable == ((1, 3), (2, 5))
    assert SteeringSpec.from_json(spec.to_json()) == spec
    hand = SteeringSpec.from_json('{"disable": ["1:3", "2:5"], "force": [[0, 7]], "boost": {"1:2": -1.5}, '
                                  '"gate_scale": [[3, 4, 64]], "top_k": {"1": 4}, "mode": "zero", "boost_unit": "std", '
                                  '"logit_std": {"1": 0.25}}')
    assert hand == spec
    assert SteeringSpec.build(spec, mode="reroute").mode == "reroute"
    assert SteeringSpec().is_empty and SteeringSpec().describe() == "no change"
    assert spec.describe().startswith("zero 1:3 2:5 · force 0:7")
    for bad, message in [('{"disable": ["1-3"]}', "LAYER:EXPERT"), ('{"boost": {"1:2": "inf"}}', "finite"),
                         ('{"colour": 1}', "unknown steering spec fields"), ("[1]", "JSON object"), ("{", "not valid JSON")]:
        with pytest.raises(SteeringError, match=message):
            SteeringSpec.from_json(bad)
