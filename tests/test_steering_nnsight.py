"""Steering and recording through nnsight give exactly what the plain hook path gives.

The nnsight side reads everything with nnsight's own API (``.output`` of the router envoys, ``tracer.iter`` over
generation steps, ``tracer.result``), so the comparison does not rely on moelens' capture hooks firing inside a
trace. Also checked: moelens imports nnsight only in its backend, and never for a plain model.
"""

from __future__ import annotations

import ast
import functools
import sys
import warnings
from pathlib import Path

import pytest
import torch

import moelens
from moelens import TraceStore
from moelens.adapters import RoutingCapture, find_routers
from moelens.recording.record import record
from moelens.steering import run_experiment, steer
from moelens.tiny import tiny_model, tiny_tokenizer

nnsight = pytest.importorskip("nnsight")

SPEC = dict(disable=[(0, 1)], force=[(1, 2)], boost={(0, 3): 0.5}, gate_scale={(1, 2): 2.0})
IDS = torch.arange(3, 35).view(2, 16)


def envoy(root, name: str):
    """The nnsight envoy of a submodule, from its qualified name (``model.layers.0.mlp.gate``)."""
    return functools.reduce(getattr, name.split("."), root)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "dbrx"])
def test_trace_outputs_and_routing_match_the_hook_path(model_type: str) -> None:
    """Outputs, and the (index, weights) every experts module receives, read with nnsight's ``.inputs``.

    (A router's nnsight ``.output`` is read before forward hooks run, so it shows the selection but not a gate
    scale; the experts' inputs are what the model uses. DBRX's router returns logits only.)
    """
    model = tiny_model(model_type)[0]
    info = find_routers(model)
    with steer(model, **SPEC), torch.inference_mode(), RoutingCapture(model, info) as capture:
        ref_logits = model(IDS).logits
        ref = {call.layer: call for call in capture.pop()}

    wrapped = nnsight.NNsight(model)
    with steer(wrapped, **SPEC):
        with wrapped.trace(IDS):
            received = nnsight.save([])
            for site in info.sites:
                received.append(envoy(wrapped, site.name.rpartition(".")[0]).experts.inputs)
            out = wrapped.output.save()
    assert torch.equal(out.logits, ref_logits)
    for site, (args, _) in zip(info.sites, received):
        experts, weights = args[1], args[2]
        assert torch.equal(experts, ref[site.layer].experts) and torch.equal(weights, ref[site.layer].weights)
        if site.layer == 0:
            assert not ((experts == 1) & (weights != 0)).any()
        else:
            assert (experts == 2).any(dim=1).all()
    with wrapped.trace(IDS):  # restored, seen through nnsight too
        plain = wrapped.output.save()
    assert torch.equal(plain.logits, model(IDS).logits)


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe"])
def test_generation_through_nnsight_matches_the_hook_path(model_type: str) -> None:
    model = tiny_model(model_type)[0]
    info = find_routers(model)
    prompt, n_new = IDS[:1, :8], 5
    kwargs = dict(max_new_tokens=n_new, do_sample=False, pad_token_id=0)
    with steer(model, **SPEC), torch.inference_mode(), RoutingCapture(model, info) as capture:
        ref_ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        ref_steps = capture.pop()[: n_new * len(info.sites)]  # the prompt call, then one per new token

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel is deprecated in favour of TransformersModel
        lm = nnsight.LanguageModel(model, tokenizer=tiny_tokenizer())
    with steer(lm, **SPEC):
        with lm.generate(prompt, **kwargs) as tracer:
            steps = nnsight.save([])
            for _ in tracer.iter[:n_new]:
                for site in info.sites:
                    steps.append(envoy(lm, site.name).output[2])
            generated = tracer.result.save()
    assert torch.equal(generated, ref_ids)
    assert len(steps) == len(ref_steps)
    for experts, call in zip(steps, ref_steps):
        assert torch.equal(experts, call.experts)


def test_record_accepts_an_nnsight_model(tmp_path) -> None:
    model = tiny_model("qwen2_moe")[0]
    tokenizer = tiny_tokenizer()
    store = TraceStore(tmp_path / "n.duckdb")
    texts = ["nnsight and hooks agree", "1 + 1 = 2"]
    runs = []
    for subject in (model, nnsight.NNsight(model)):
        with steer(subject, disable=[(1, 4)]):
            runs.append(record(subject, tokenizer, texts, store=store, generate=3, progress=False))
    query = "SELECT seq_id, pos, layer, rank, expert, weight FROM routing WHERE run_id = ? ORDER BY ALL"
    a, b = (store.query(query, [run]) for run in runs)
    assert len(a) > 0 and a.equals(b)
    assert store.query("SELECT token_id FROM tokens WHERE run_id = ? ORDER BY seq_id, pos", [runs[0]]).equals(
        store.query("SELECT token_id FROM tokens WHERE run_id = ? ORDER BY seq_id, pos", [runs[1]])
    )


def test_nnsight_is_imported_only_by_the_backend_and_only_when_needed(monkeypatch, tmp_path) -> None:
    """Statically: every ``import nnsight`` in moelens sits inside a function of the backend. Dynamically: with
    nnsight made unimportable, steering, calibrating, recording and an experiment on a plain model still work."""
    root = Path(moelens.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name.split(".")[0] == "nnsight" for name in names):
                assert path.relative_to(root).as_posix() == "adapters/wrapped.py" and id(node) in inside, f"{path}:{node.lineno}"

    for name in [n for n in sys.modules if n.split(".")[0] == "nnsight"]:  # any nnsight import now fails
        monkeypatch.setitem(sys.modules, name, None)
    model = tiny_model("mixtral")[0]
    with moelens.steer(model, boost={(0, 1): 1.0}, boost_unit="std", calibration=IDS):
        record(model, tiny_tokenizer(), ["abc def"], store=TraceStore(tmp_path / "x.duckdb"), progress=False)
    run_experiment(model, tiny_tokenizer(), {"disable": [[0, 1]]}, ["abc def ghi"], n_random=1)
