"""On the trained demo model, disabling a domain's most specialised experts hurts that domain most.

Runs the same code as ``benchmarks/steering_demo.py`` (imported from there) on a subset of the held-out tokens:
experts selected by nPMI on one half of the held-out documents, losses measured on the other half. Skipped
until the demo model has been trained and bundled.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from moelens import TraceStore
from moelens.demo import DEMO_MODEL_DIR
from moelens.recording.loading import load_model
from moelens.recording.record import record

pytestmark = pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "model.safetensors").exists(), reason="the demo model is not bundled yet"
)
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "steering_demo.py"


def benchmark_module():
    spec = importlib.util.spec_from_file_location("steering_demo", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("domain", ["math", "multilingual"])
def test_disabling_a_domains_experts_hurts_that_domain_more_than_random_and_others(domain: str, demo, tmp_path) -> None:
    model, tokenizer, bench, store, run, evaluation = demo
    spec, result = bench.domain_experiment(model, tokenizer, store, run, domain, evaluation, n=4, n_random=5)
    assert len(spec.disable) == 4
    control = result.control.set_index("label")
    own = control.loc[domain]
    assert own["n_random"] == 5
    assert own["delta_loss"] > own["random_mean"] + 2 * own["random_std"]
    assert own["delta_loss"] > control.drop(index=domain)["delta_loss"].max()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model, the selection run (1,000 held-out tokens per domain) and 400 evaluation tokens per domain."""
    torch.set_num_threads(1)
    bench = benchmark_module()
    model, tokenizer = load_model(DEMO_MODEL_DIR, dtype="float32")
    selection, _ = bench.split_heldout(tokenizer, 1000)
    _, evaluation = bench.split_heldout(tokenizer, 400)
    store = TraceStore(tmp_path_factory.mktemp("demo") / "select.duckdb")
    run = record(model, tokenizer, selection, store=store, seq_len=256, progress=False)
    return model, tokenizer, bench, store, run, evaluation
