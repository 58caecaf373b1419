"""Capture on models whose routers do not all live on one device: accelerate's disk/CPU offload here, several
CUDA devices (or CUDA + CPU offload) where the machine has them. Whatever the placement, the recording equals
the one of the same model in one piece on the CPU."""

from __future__ import annotations

import pytest
import torch

from moelens.adapters import RoutingCapture, find_routers
from moelens.adapters.capture import RouterCall
from moelens.adapters.capture_transfer import to_host, transfer_groups
from moelens.adapters.contributions import ContributionCall
from moelens.tiny import tiny_model

pytest.importorskip("accelerate")


def _calls(model, ids):
    info = find_routers(model)
    with torch.inference_mode(), RoutingCapture(model, info) as capture:
        model(ids)
        return capture.pop()


def _same(a: list[RouterCall], b: list[RouterCall]) -> None:
    assert [c.layer for c in a] == [c.layer for c in b]
    for x, y in zip(a, b):
        assert x.experts.device.type == "cpu" and torch.equal(x.experts, y.experts)
        assert torch.equal(x.weights, y.weights)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, _ = tiny_model("qwen3_moe", num_hidden_layers=3)
    path = tmp_path_factory.mktemp("offload") / "model"
    model.save_pretrained(path)
    return path, model


def test_disk_and_cpu_offloaded_layers_record_the_same_routing(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    path, reference = saved
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=str(tmp_path / "off"),
                                                     dtype=torch.float32).eval()
    ids = torch.randint(0, reference.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    _same(_calls(offloaded, ids), _calls(reference, ids))


@pytest.mark.parametrize("model_type, kept", [("mixtral", {"logits": True}), ("qwen2_moe", {"contributions": True})])
def test_async_pop_equals_pop_on_cpu(model_type, kept):
    """`pop_async` (contribution calls in the routing's transfer) changes not a bit of what a blocking pop gives."""
    model, _ = tiny_model(model_type)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    info = find_routers(model)
    with torch.inference_mode(), RoutingCapture(model, info, **kept) as capture:
        model(ids)
        pending = capture.pop_async()
        model(ids)
        blocking = capture.contributions.pop() if capture.contributions is not None else None
        routed = capture.pop()
    _same(pending.wait(), routed)
    got = pending.wait_contributions()
    if blocking is None:
        assert got is None
        return
    assert [c.layer for c in got] == [c.layer for c in blocking] == [s.layer for s in info.sites]
    for x, y in zip(got, blocking):
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in ContributionCall.TENSORS)
        assert x.norms.device.type == "cpu"


def test_tensors_on_several_devices_are_grouped_not_concatenated():
    """Calls on different devices each get back their own values (CUDA devices where the machine has them)."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    calls = [RouterCall(layer=i, experts=torch.full((3, 2), i, device=devices[i % len(devices)]),
                        weights=torch.full((3, 2), i / 10, device=devices[i % len(devices)])) for i in range(4)]
    out = to_host(calls, non_blocking=True).wait()
    for i, call in enumerate(out):
        assert call.experts.device.type == "cpu" and (call.experts == i).all() and torch.allclose(call.weights, torch.tensor(i / 10))


def test_one_transfer_per_device_and_dtype_for_routing_and_contributions_together():
    """The grouping, on meta tensors standing in for an accelerator's (devices and dtypes only, no data): routing
    and contribution tensors of one forward share one group per (device, dtype); CPU tensors need no transfer.
    (Two accelerators never share a group: the CUDA tests above, where the machine has several devices.)"""
    meta = {"device": "meta"}
    route = [RouterCall(layer=0, experts=torch.empty(3, 2, dtype=torch.int64, **meta), weights=torch.empty(3, 2, **meta),
                        logits=torch.empty(3, 4, dtype=torch.bfloat16, **meta)),
             RouterCall(layer=1, experts=torch.empty(3, 2, dtype=torch.int64), weights=torch.empty(3, 2),
                        shared_gate=torch.empty(3, **meta))]
    contrib = [ContributionCall(0, torch.empty(3, 2, **meta), torch.empty(3, 2, **meta), torch.empty(3, **meta)),
               ContributionCall(1, torch.empty(3, 2), torch.empty(3, 2), torch.empty(3))]
    groups = transfer_groups([*route, *contrib])
    named = {key: [(type(r).__name__, r.layer, f) for r, f in owners] for key, owners in groups.items()}
    on = torch.device("meta")
    assert named == {
        (on, torch.int64): [("RouterCall", 0, "experts")],
        (on, torch.float32): [("RouterCall", 0, "weights"), ("RouterCall", 1, "shared_gate"),
                              ("ContributionCall", 0, "weights"), ("ContributionCall", 0, "norms"),
                              ("ContributionCall", 0, "cos")],
        (on, torch.bfloat16): [("RouterCall", 0, "logits")],
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_split_over_cuda_devices_and_cpu(saved):
    from transformers import AutoModelForCausalLM

    path, reference = saved
    last = f"cuda:{torch.cuda.device_count() - 1}"
    device_map = {"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0", "model.layers.1": last,
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    split = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=torch.float32).eval()
    ids = torch.randint(0, reference.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    info = find_routers(split)
    with torch.inference_mode(), RoutingCapture(split, info) as capture:
        split(ids.to("cuda:0"))
        got = capture.pop_async().wait()
    _same(got, _calls(reference, ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_contributions_on_cuda_arrive_asynchronously_and_match_the_cpu():
    model, _ = tiny_model("qwen2_moe")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    info = find_routers(model)
    with torch.inference_mode(), RoutingCapture(model, info, contributions=True) as capture:
        model(ids)
        want = capture.contributions.pop()
    gpu = model.to("cuda")
    info = find_routers(gpu)
    with torch.inference_mode(), RoutingCapture(gpu, info, contributions=True) as capture:
        gpu(ids.to("cuda"))
        pending = capture.pop_async()
        got = pending.wait_contributions()
    for x, y in zip(got, want, strict=True):
        assert x.norms.device.type == "cpu" and x.norms.is_pinned()
        torch.testing.assert_close(x.norms, y.norms, rtol=1e-4, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(x.cos, y.cos, rtol=1e-4, atol=1e-5)


def test_capture_under_torch_compile_without_cuda_graphs():
    """Dynamo traces the read-only hooks into the compiled forward (``aot_eager``: tracing, no code generation,
    so the numbers are the eager ones and must match exactly)."""
    model, _ = tiny_model("qwen3_moe")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="aot_eager")
    info = find_routers(model)
    with torch.inference_mode(), RoutingCapture(model, info) as capture:
        compiled(ids)
        got = capture.pop()
    _same(got, _calls(model, ids))
