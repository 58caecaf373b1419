"""Expert-contribution capture: bitwise-neutral on every architecture, norms and cosines against slow recomputes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelens.adapters import RoutingCapture, find_routers
from moelens.errors import InputError
from moelens.recording.record import record
from moelens.tiny import TINY_MODEL_TYPES, tiny_model, tiny_tokenizer

SUPPORTED = [t for t in TINY_MODEL_TYPES if t != "jetmoe"]


def _inputs(model) -> dict:
    ids = torch.randint(4, 120, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = ids
    return kw


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_outputs_bitwise_identical_and_every_block_captured(model_type: str) -> None:
    model, _ = tiny_model(model_type)
    info = find_routers(model)
    kw = _inputs(model)
    with torch.no_grad():
        plain = model(**kw).logits
        with RoutingCapture(model, info, contributions=True) as capture:
            hooked = model(**kw).logits
            calls, routed = capture.contributions.pop(), capture.pop()
        after = model(**kw).logits
    assert torch.equal(plain, hooked) and torch.equal(plain, after)
    assert [c.layer for c in calls] == [r.layer for r in routed]
    for call, route in zip(calls, routed):
        assert call.norms.shape == route.experts.shape and call.cos.shape == (route.experts.shape[0],)
        assert torch.equal(call.weights, route.weights)  # same slots as the routing capture
        has = route.experts >= 0
        assert (call.norms[has] > 0).all() and call.norms[~has].isnan().all()
        assert ((call.cos > -1.0001) & (call.cos < 1.0001)).all()


@torch.no_grad()
def _slow_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Mixtral-layout expert e on one token, written out: down(act(gate(x)) * up(x))."""
    gate, up = (experts.gate_up_proj[e] @ x).chunk(2)
    return experts.down_proj[e] @ (experts.act_fn(gate) * up)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_norms_and_cosine_match_a_slow_recompute(model_type: str) -> None:
    model, _ = tiny_model(model_type)
    info = find_routers(model)
    site = info.sites[0]
    layer = model.model.layers[site.block]
    seen: dict = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
        layer.mlp.experts.register_forward_hook(lambda m, a, o: seen.update(u=a[0], idx=a[1], r=o)),
    ]
    with torch.no_grad(), RoutingCapture(model, info, contributions=True) as capture:
        model(**_inputs(model))
        call = capture.contributions.pop()[0]
    for h in hooks:
        h.remove()
    experts = layer.mlp.experts
    u, idx = seen["u"].reshape(-1, seen["u"].shape[-1]), seen["idx"]
    slow = torch.tensor([[float(_slow_expert(experts, int(e), u[t]).norm()) for e in idx[t]] for t in range(len(u))])
    torch.testing.assert_close(call.norms, slow, rtol=1e-5, atol=1e-6)
    x = seen["x"].reshape(u.shape)
    torch.testing.assert_close(call.cos, F.cosine_similarity(x, x + seen["r"].reshape(u.shape), dim=-1))


def test_switch_norms_times_gate_are_the_routed_output_norm() -> None:
    """Top-1 without renormalisation: the routed output is w * f(x), so ‖r‖ = w ‖f‖ (0 for dropped tokens)."""
    model, _ = tiny_model("switch_transformers", expert_capacity=4)
    info = find_routers(model)
    site = info.sites[0]
    seen = {}
    handle = model.get_submodule(site.name.rpartition(".")[0]).experts.register_forward_hook(
        lambda m, a, o: seen.update(r=o))
    with torch.no_grad(), RoutingCapture(model, info, contributions=True) as capture:
        model(**_inputs(model))
        call = capture.contributions.pop()[0]
    handle.remove()
    r = seen["r"].norm(dim=-1)
    dropped = call.norms[:, 0].isnan()
    assert dropped.any() and torch.equal(r[dropped], torch.zeros(int(dropped.sum())))
    torch.testing.assert_close(call.weights[~dropped, 0] * call.norms[~dropped, 0], r[~dropped], rtol=1e-5, atol=1e-6)


def test_unsupported_architecture_is_refused_before_a_run_exists(store) -> None:
    model, _ = tiny_model("jetmoe")
    with pytest.raises(InputError, match="not supported for 'jetmoe'"):
        record(model, tiny_tokenizer(), ["abc def"], store=store, contributions=True, progress=False)
    assert store.runs().empty


@pytest.mark.parametrize("generate", [None, 4])
def test_recorded_tables_join_routing_rank_by_rank(store, generate) -> None:
    model, _ = tiny_model("deepseek_v3")  # unsorted router slots: ranks must follow the routing table's order
    tok = tiny_tokenizer()
    texts = ["def f(x): return x", "the cat sat", "1 + 2 = 3 and more text here"]
    plain = record(model, tok, texts, store=store, batch_size=2, progress=False, generate=generate)
    run = record(model, tok, texts, store=store, batch_size=2, progress=False, generate=generate, contributions=True)
    assert store.run(run)["metadata"]["contributions"] is True
    same = store.query("SELECT count(*) AS n FROM tokens a JOIN tokens b USING (seq_id, pos, token_id) "
                       "WHERE a.run_id = ? AND b.run_id = ? AND a.predicted_id IS NOT DISTINCT FROM b.predicted_id", [plain, run])
    n_tokens = len(store.tokens(run))
    assert same["n"][0] == n_tokens  # recording contributions changed no prediction
    joined = store.query(
        "SELECT r.expert, c.norm FROM routing r LEFT JOIN expert_contributions c USING (run_id, seq_id, pos, layer, rank) "
        "WHERE r.run_id = ?", [run])
    assert len(joined) == n_tokens * 2 * 2 and joined["norm"].notna().all()
    cos = store.query("SELECT count(*) AS n, min(cos) AS lo, max(cos) AS hi FROM block_residuals WHERE run_id = ?", [run])
    assert cos["n"][0] == n_tokens * 2 and -1 <= cos["lo"][0] <= cos["hi"][0] <= 1.0001


def test_granite_cosine_uses_what_the_layer_adds_to_the_residual() -> None:
    """GraniteMoE adds residual_multiplier x the MoE output; with no shared expert x + r is the layer's output."""
    model, _ = tiny_model("granitemoe", residual_multiplier=0.5)
    info = find_routers(model)
    layer = model.model.layers[info.sites[0].block]
    seen: dict = {}
    hooks = [layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
             layer.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))]
    with torch.no_grad(), RoutingCapture(model, info, contributions=True) as capture:
        model(**_inputs(model))
        call = capture.contributions.pop()[0]
    for h in hooks:
        h.remove()
    x, out = (seen[k].reshape(-1, seen[k].shape[-1]) for k in ("x", "out"))
    torch.testing.assert_close(call.cos, F.cosine_similarity(x, out, dim=-1), rtol=1e-5, atol=1e-6)


def test_chunked_recompute_gives_the_same_norms(monkeypatch) -> None:
    from moelens.adapters import contributions

    model, _ = tiny_model("olmoe")
    info = find_routers(model)

    def norms() -> torch.Tensor:
        with torch.no_grad(), RoutingCapture(model, info, contributions=True) as capture:
            model(**_inputs(model))
            return torch.cat([c.norms for c in capture.contributions.pop()])

    whole = norms()
    monkeypatch.setattr(contributions, "SLOT_CHUNK", 5)  # 48 slots per layer -> 10 chunks, the last one short
    torch.testing.assert_close(norms(), whole, rtol=1e-6, atol=1e-6)
