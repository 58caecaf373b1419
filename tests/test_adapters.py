"""Adapters: router discovery and routing capture, proven against what the experts modules actually receive.

Every required architecture runs on a tiny random-weight model (moelens.tiny). Ground truth is a forward pre-hook
on each site's experts module, independent of the router output the capture decodes.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from moelens.adapters import SUPPORTED_MODEL_TYPES, RouterCall, RoutingCapture, find_routers
from moelens.errors import NotMoEError
from moelens.tiny import TINY_MODEL_TYPES, tiny_model, tiny_tokenizer

# Variants with dense layers, so that list position != layer index.
DENSE_VARIANTS: dict[str, tuple[str, dict[str, Any], set[int]]] = {
    "deepseek_v3-dense": ("deepseek_v3", dict(num_hidden_layers=3, first_k_dense_replace=1), {1, 2}),
    "qwen2_moe-dense": ("qwen2_moe", dict(num_hidden_layers=3, mlp_only_layers=[0]), {1, 2}),
    "llama4_text-dense": ("llama4_text", dict(num_hidden_layers=4, interleave_moe_layer_step=2), {1, 3}),
}
EXPECTED_LAYERS = {
    **{t: {0, 1} for t in TINY_MODEL_TYPES},
    "jetmoe": {0, 1, 2, 3},  # MLP MoE of block i -> i, attention MoA of block i -> 2 + i
    "switch_transformers": {0, 1, 2, 3},  # encoder blocks 0, 1; decoder blocks -> 2, 3
    "ernie4_5_moe": {1},  # moe_layer_start_index = 1
}
CASES = {**{t: (t, {}, EXPECTED_LAYERS[t]) for t in TINY_MODEL_TYPES}, **DENSE_VARIANTS}
CAUSAL = [t for t in TINY_MODEL_TYPES if t != "switch_transformers"]


@functools.cache
def model_for(case: str) -> Any:
    """One model per case for the whole file: building is cheap, but 20 cases x 8 tests adds up."""
    model_type, overrides, _ = CASES[case]
    return tiny_model(model_type, **overrides)[0]


def token_ids(batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    """Distinct ids 3..127, so that no two rows of a layer-0 router input are equal (JetMoE check needs it)."""
    return (torch.randperm(125, generator=torch.Generator().manual_seed(seed))[: batch * seq] + 3).view(batch, seq)


def forward(model: Any, ids: torch.Tensor, **kwargs: Any) -> Any:
    if model.config.is_encoder_decoder:
        return model(input_ids=ids, decoder_input_ids=ids, **kwargs)
    return model(ids, **kwargs)


def by_layer(calls: list[RouterCall]) -> dict[int, RouterCall]:
    out = {call.layer: call for call in calls}
    assert len(out) == len(calls), "one call per layer per forward"
    return out


def hook_counts(model: Any) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


# --- ground truth: what the experts module received ------------------------------------------------------------


def _experts_inputs(model: Any, ids: torch.Tensor) -> tuple[dict[int, tuple], dict[int, torch.Tensor], list]:
    """Run one captured forward with pre-hooks on every experts module (and router input)."""
    info = find_routers(model)
    received: dict[int, tuple] = {}
    block_inputs: dict[int, torch.Tensor] = {}
    handles = []
    for site in info.sites:
        handles.append(
            site.experts.register_forward_pre_hook(lambda m, args, layer=site.layer: received.setdefault(layer, args))
        )
        if site.family in ("llama4", "jetmoe"):  # the router's input is the hidden state the experts get
            def keep_input(module: Any, args: tuple, layer: int = site.layer) -> None:
                block_inputs.setdefault(layer, args[0])

            handles.append(model.get_submodule(site.name).register_forward_pre_hook(keep_input))
    try:
        with RoutingCapture(model, info, logits=True) as capture:
            forward(model, ids)
        calls = capture.pop()
    finally:
        for handle in handles:
            handle.remove()
    return received, block_inputs, calls


def assert_matches_experts_input(site: Any, call: RouterCall, args: tuple, block_input: torch.Tensor | None) -> None:
    n_tokens = call.experts.shape[0]
    assert call.experts.dtype == torch.int64 and call.weights.dtype == torch.float32
    assert call.experts.shape == call.weights.shape == (n_tokens, site.top_k)
    if site.family in ("standard", "dbrx"):
        assert torch.equal(call.experts, args[1].long())
        assert torch.equal(call.weights, args[2].float())
    elif site.family == "llama4":  # experts get h * score for every expert, 0 where unselected
        hidden = block_input.reshape(n_tokens, -1)
        dense = torch.zeros(n_tokens, site.n_experts).scatter(1, call.experts, call.weights)
        expected = hidden.repeat(site.n_experts, 1) * dense.transpose(0, 1).reshape(-1, 1)
        assert torch.equal(expected, args[0])
    elif site.family == "jetmoe":  # input_linear(inputs grouped by expert, expert_size)
        expert_size = args[1]
        assert torch.bincount(call.experts.flatten(), minlength=site.n_experts).tolist() == expert_size
        hidden = block_input.reshape(n_tokens, -1)
        token_of_row = (args[0][:, None, :] == hidden[None]).all(-1).float().argmax(1)
        expert_of_row = torch.repeat_interleave(torch.arange(site.n_experts), torch.tensor(expert_size))
        received_pairs = (token_of_row * site.n_experts + expert_of_row).sort().values
        captured_pairs = (torch.arange(n_tokens)[:, None] * site.n_experts + call.experts).flatten().sort().values
        assert torch.equal(received_pairs, captured_pairs)
        # Gates are applied outside any module: check each slot's weight against its own expert,
        # and that slots keep the gating's top-k order.
        assert torch.equal(call.experts, call.logits.topk(site.top_k, dim=-1).indices)
        torch.testing.assert_close(call.weights, call.logits.gather(1, call.experts).softmax(-1))
    elif site.family == "switch":  # experts get the one-hot dispatch after capacity, and the max prob
        dispatch = torch.zeros(n_tokens, site.n_experts, dtype=torch.long)
        kept = call.experts[:, 0] >= 0
        dispatch[kept] = dispatch[kept].scatter(1, call.experts[kept], 1)
        assert torch.equal(dispatch, args[1].reshape(n_tokens, -1))
        assert torch.equal(call.weights, args[2].reshape(n_tokens, 1).float())
    else:
        pytest.fail(f"untested family {site.family}")


@pytest.mark.parametrize("case", CASES)
def test_capture_equals_experts_input(case: str) -> None:
    model = model_for(case)
    info = find_routers(model)
    assert set(info.layers) == CASES[case][2]
    ids = token_ids()
    received, block_inputs, calls = _experts_inputs(model, ids)
    calls_by_layer = by_layer(calls)
    assert set(calls_by_layer) == set(received) == CASES[case][2]
    for site in info.sites:
        call = calls_by_layer[site.layer]
        assert call.experts.shape[0] == ids.numel()
        assert f".{site.block}." in site.name
        assert_matches_experts_input(site, call, received[site.layer], block_inputs.get(site.layer))


@pytest.mark.parametrize("model_type", ["hunyuan_v1_moe", "minimax", "inkling_text", "aria_text", "flex_olmo"])
def test_generic_path_other_architectures(model_type: str) -> None:
    """No per-architecture code: a different gate class, a layer_name-filtered declaration, a 4-tuple router."""
    model, config = tiny_model(model_type)
    info = find_routers(model)
    received, _, calls = _experts_inputs(model, token_ids())
    assert set(by_layer(calls)) == set(received) == set(info.layers) == set(range(config.num_hidden_layers))
    for call in calls:
        assert_matches_experts_input(info.site(call.layer), call, received[call.layer], None)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_outputs_bitwise_identical_and_hooks_removed(model_type: str) -> None:
    model = model_for(model_type)
    ids = token_ids()
    before = hook_counts(model)
    with torch.no_grad():
        plain = forward(model, ids).logits
        with RoutingCapture(model, logits=True) as capture:
            assert hook_counts(model) != before
            recorded = forward(model, ids).logits
    assert torch.equal(plain, recorded)
    assert hook_counts(model) == before
    assert capture.pop() and capture.pop() == []  # drained


@pytest.mark.parametrize("model_type", ["mixtral", "dbrx", "qwen2_moe", "jetmoe"])
def test_hooks_removed_when_forward_raises(model_type: str) -> None:
    model = model_for(model_type)
    info = find_routers(model)
    before = hook_counts(model)

    def boom(module: Any, args: Any, output: Any) -> None:
        raise RuntimeError("boom")

    last = model.get_submodule(info.sites[-1].name)
    with pytest.raises(RuntimeError, match="boom"):
        with RoutingCapture(model, info):
            handle = last.register_forward_hook(boom)
            try:
                forward(model, token_ids())
            finally:
                handle.remove()
    assert hook_counts(model) == before


@pytest.mark.parametrize("model_type", CAUSAL)
def test_generate_with_kv_cache_equals_full_forward(model_type: str) -> None:
    """Prompt rows, then one row per step, concatenated == one forward over the final sequence (minus the last)."""
    model = model_for(model_type)
    prompt = token_ids(1, 8, seed=2)
    with torch.no_grad(), RoutingCapture(model) as capture:
        sequence = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        steps = capture.pop()
        forward(model, sequence[:, :-1])
        full = by_layer(capture.pop())
    n_steps = sequence.shape[1] - prompt.shape[1]
    for layer, call in full.items():
        per_step = [c for c in steps if c.layer == layer]
        assert [c.experts.shape[0] for c in per_step] == [prompt.shape[1]] + [1] * (n_steps - 1)
        assert torch.equal(torch.cat([c.experts for c in per_step]), call.experts)
        torch.testing.assert_close(torch.cat([c.weights for c in per_step]), call.weights)


@pytest.mark.parametrize(
    ("model_type", "shared"),
    [("qwen2_moe", "sigmoid"), ("qwen3_next", "sigmoid"), ("deepseek_v3", "one"), ("llama4_text", "one"),
     ("granitemoeshared", "one"), ("mixtral", None), ("gpt_oss", None)],
)
def test_shared_gate(model_type: str, shared: str | None) -> None:
    model = model_for(model_type)
    info = find_routers(model)
    assert info.n_shared_experts == (0 if shared is None else 1)
    router_inputs: dict[int, torch.Tensor] = {}
    handles = [
        model.get_submodule(site.name).register_forward_pre_hook(
            lambda m, args, layer=site.layer: router_inputs.setdefault(layer, args[0])
        )
        for site in info.sites
    ]
    ids = token_ids()
    try:
        with torch.no_grad(), RoutingCapture(model, info) as capture:
            forward(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    for call in capture.pop():
        site = info.site(call.layer)
        if shared is None:
            assert call.shared_gate is None and site.shared_gate is None
        elif shared == "one":
            assert torch.equal(call.shared_gate, torch.ones(ids.numel()))
        else:
            hidden = router_inputs[call.layer].reshape(ids.numel(), -1)
            expected = torch.sigmoid(site.shared_gate(hidden)).reshape(-1)
            assert call.shared_gate.dtype == torch.float32
            assert torch.equal(call.shared_gate, expected)
            assert not torch.equal(call.shared_gate, torch.ones_like(expected))


def test_switch_capacity_drops_are_minus_one() -> None:
    model, _ = tiny_model("switch_transformers", expert_capacity=4)
    ids = token_ids(2, 32)
    received, _, calls = _experts_inputs(model, ids)
    info = find_routers(model)
    for call in calls:
        dispatch = received[call.layer][1].reshape(ids.numel(), -1)
        dropped = dispatch.sum(-1) == 0
        assert dropped.any(), "2 x 32 tokens over 8 experts with capacity 4 must drop some"
        assert torch.equal(call.experts[:, 0] == -1, dropped)
        kept = call.experts.view(2, 32)
        for expert in range(8):  # capacity is per sequence and expert
            assert ((kept == expert).sum(-1) <= 4).all()
        assert_matches_experts_input(info.site(call.layer), call, received[call.layer], None)


def test_non_moe_model_raises_with_supported_types() -> None:
    model, _ = tiny_model("llama")
    with pytest.raises(NotMoEError) as raised:
        find_routers(model)
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in str(raised.value)
    assert "llama" in str(raised.value)
    with pytest.raises(NotMoEError):
        RoutingCapture(model)
    assert set(TINY_MODEL_TYPES) <= set(SUPPORTED_MODEL_TYPES)


def _transformers_router_logits(model: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """What output_router_logits returns, one [T, E] entry per router call in call order."""
    out = forward(model, ids, output_router_logits=True)
    if model.config.is_encoder_decoder:
        entries = [*out.encoder_router_logits, *out.decoder_router_logits]
    else:
        entries = list(out.router_logits)
    if model.config.model_type == "jetmoe":
        entries = _jetmoe_router_calls(entries, model.config.num_hidden_layers)
    return [e.reshape(-1, e.shape[-1]) for e in entries]


def _jetmoe_router_calls(entries: list[torch.Tensor], n_blocks: int) -> list[torch.Tensor]:
    """JetMoE's entries as one per router call (per block: attention MoA gating, then MLP gating).

    transformers <= 5.23 also lists the MoA logits a second time per block (recorded again from the attention
    module's output); 5.24 lists each call once. Either layout is accepted, the repeat only if it is an exact copy.
    """
    if len(entries) == 3 * n_blocks:
        repeats = entries[1::3]
        assert all(torch.equal(again, moa) for again, moa in zip(repeats, entries[0::3]))
        entries = [e for i, e in enumerate(entries) if i % 3 != 1]
    assert len(entries) == 2 * n_blocks, f"{len(entries)} router_logits entries for {n_blocks} JetMoE blocks"
    return entries


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_output_router_logits(case: str) -> None:
    model = model_for(case)
    ids = token_ids()
    with torch.no_grad():
        expected = _transformers_router_logits(model, ids)
        with RoutingCapture(model, logits=True) as capture:
            forward(model, ids)
    calls = capture.pop()
    assert len(calls) == len(expected)
    for call, logits in zip(calls, expected):
        assert call.logits.shape == (ids.numel(), find_routers(model).site(call.layer).n_experts)
        assert torch.equal(call.logits, logits.float())
    with RoutingCapture(model) as capture:
        forward(model, ids)
    assert all(call.logits is None for call in capture.pop())


def test_deepseek_v3_correction_bias_changes_selection() -> None:
    """With a large bias on one expert, selection differs from logits-only top-k; capture still equals truth."""
    model, _ = tiny_model("deepseek_v3")
    info = find_routers(model)
    for site in info.sites:
        assert site.correction_bias is not None
        site.correction_bias.zero_()[3] = 3.0
    ids = token_ids()
    received, _, calls = _experts_inputs(model, ids)
    for call in calls:
        site = info.site(call.layer)
        assert_matches_experts_input(site, call, received[call.layer], None)
        assert (call.experts == 3).any(-1).all()
    with RoutingCapture(model, info, logits=True) as capture:
        forward(model, ids)
    call = capture.pop()[0]
    logits_only = torch.topk(call.logits.sigmoid(), 2, dim=-1).indices
    assert not torch.equal(logits_only.sort(-1).values, call.experts.sort(-1).values)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3", "gpt_oss", "mixtral"])
def test_bf16_capture_equals_experts_input(model_type: str) -> None:
    model, _ = tiny_model(model_type, dtype=torch.bfloat16)
    received, _, calls = _experts_inputs(model, token_ids())
    info = find_routers(model)
    for call in calls:
        assert_matches_experts_input(info.site(call.layer), call, received[call.layer], None)


@pytest.mark.parametrize("case", CASES)
def test_moe_info(case: str) -> None:
    model = model_for(case)
    info = find_routers(model)
    config = model.config
    assert info.layers == sorted(CASES[case][2])
    assert info.site(info.layers[-1]).layer == info.layers[-1]
    with pytest.raises(KeyError, match="MoE layers"):
        info.site(99)
    assert info.n_experts == 8 and info.top_k == (1 if CASES[case][0] in ("llama4_text", "switch_transformers") else 2)
    assert info.is_encoder_decoder == config.is_encoder_decoder
    assert info.n_layers == (4 if config.is_encoder_decoder else config.num_hidden_layers)
    assert info.routing_function and "Router" not in info.routing_function
    for site in info.sites:
        router = model.get_submodule(site.name)
        assert site.module is (site.experts if site.family == "dbrx" else router)
        assert any(p is site.logit_weight for p in router.parameters())
        assert site.logit_weight.shape[0] == site.n_experts


def test_tiny_tokenizer_is_local_and_exact() -> None:
    tok = tiny_tokenizer()
    text = "Hé, MoE!\n"
    enc = tok(text, return_offsets_mapping=True)
    assert len(enc["input_ids"]) == len(text) and max(enc["input_ids"]) < 128
    assert [text[a:b] for a, b in enc["offset_mapping"]] == list(text)
    assert tok.decode(enc["input_ids"]) == text.replace("é", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tiny_tokenizer(vocab_size=64)) == 64
