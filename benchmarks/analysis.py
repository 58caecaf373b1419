"""Benchmark of `moelens.analysis`: every score on synthetic traces of 1M tokens × 16 layers (top-2 of 16
and top-8 of 64) written to a temporary DuckDB trace store, plus the store write and load times.

Each score is also timed with the simple per-token reference implementation of the tests
(``tests/analysis_reference.py``) on a subsample of whole sequences and one layer (two for cross-layer
scores), extrapolated linearly to all tokens and layers; the table says so. Scores without a reference
implementation show "—".

    python benchmarks/analysis.py                 # full run, writes benchmarks/results/analysis.md
    python benchmarks/analysis.py --tokens 100000 # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import analysis_reference as ref  # noqa: E402

import moelens.analysis as A  # noqa: E402
from moelens import TraceStore  # noqa: E402
from moelens.analysis import RoutingData  # noqa: E402

CONFIGS = {"top-2 of 16": (16, 2), "top-8 of 64": (64, 8)}
SEQ_LEN = 512
SEGMENTS = (4, 16, 64, 256)

#: Parameters for scores that need some (everything else runs with its defaults).
PARAMS: dict[str, dict[str, Any]] = {
    "expert_top_tokens": {"layer": 0, "expert": 0},
    "npmi": {"label": "domain0"},
    "npmi_combined": {"targets": [(1.0, {"label": "domain0"}), (-1.0, {"tokens": [1, 2, 3]})]},
    "risk_difference": {"label_a": "domain0", "label_b": "domain1"},
}


def sample_sequences(data: RoutingData, per_label: int) -> list[int]:
    """The first ``per_label`` sequence ids of every label (so label-contrast scores have both sides)."""
    starts = np.flatnonzero(np.r_[True, data.seq_id[1:] != data.seq_id[:-1]])
    chosen: list[int] = []
    for code in range(len(data.label_names)):
        chosen += data.seq_id[starts[data.label[starts] == code][:per_label]].tolist()
    return sorted(chosen)


def to_trace(data: RoutingData, seq_ids: list[int], layers: list[int]) -> ref.Trace:
    """Sequences ``seq_ids`` of ``data`` as a reference `Trace` (only ``layers``)."""
    trace = ref.Trace(int(data.n_experts[0]), int(data.top_k[0]), [int(data.layer_ids[li]) for li in layers])
    names = data.label_names
    for s in seq_ids:
        idx = np.flatnonzero(data.seq_id == s)
        seq = []
        for t in idx:
            slots = {
                int(data.layer_ids[li]): [
                    None if e < 0 else (int(e), float(w)) for e, w in zip(data.experts[li, t], data.weights[li, t])
                ]
                for li in layers
            }
            label = names[data.label[t]] if data.label[t] >= 0 else None
            seq.append(ref.Tok(int(data.token_id[t]), label, slots, int(data.predicted_id[t]), "prompt"))
        trace.seqs.append(seq)
    return trace


def reference_calls(trace: ref.Trace, other: ref.Trace) -> dict[str, tuple[Callable[[], Any], str]]:
    """Per score: (reference call on the trace's first layer, what its cost grows with: tokens or sequences)."""
    l0 = trace.layers[0]
    l1 = trace.layers[1]

    def committee() -> Any:
        last = [seq[-1] for seq in trace.seqs]
        lists = {}
        for d in sorted({t.label for t in last if t.label}):
            units = [t.slots[l0] for t in last if t.label == d]
            values = ref.eci(units, trace.n_experts, "minmax")
            order = sorted(range(trace.n_experts), key=lambda e: (-values[e], e))[: trace.top_k]
            lists[d] = [(e, values[e]) for e in order]
        return ref.audit(lists, 0.8, trace.n_experts) if lists else None

    return {
        "expert_load": (lambda: ref.load(trace, l0), "tokens"),
        "layer_balance": (lambda: ref.load(trace, l0), "tokens"),
        "domain_specialization": (lambda: ref.domain_spec(trace, l0), "tokens"),
        "domain_summary": (lambda: ref.domain_summary(trace, l0), "tokens"),
        "vocabulary_specialization": (lambda: ref.vocabulary(trace, l0, "input", 10), "tokens"),
        "vocabulary_by_expert": (lambda: ref.vocabulary(trace, l0, "input", 10), "tokens"),
        "coactivation": (lambda: ref.coactivation(trace, l0), "tokens"),
        "cross_layer_transitions": (lambda: ref.transitions(trace, l0, l1), "tokens"),
        "cross_layer_consistency": (lambda: ref.consistency(trace, l0, l1), "tokens"),
        "repetition": (lambda: ref.repetition(trace, l0), "tokens"),
        "srp": (lambda: [ref.srp(trace, l0, m) for m in SEGMENTS], "tokens"),
        "sch": (lambda: [ref.sch(trace, l0, m) for m in (*SEGMENTS, None)], "tokens"),
        "run_agreement": (lambda: ref.agreement(trace, other, l0), "tokens"),
        "npmi": (lambda: ref.npmi(trace, l0, lambda t: t.label == "domain0"), "tokens"),
        "risk_difference": (lambda: ref.risk_difference(trace, l0, "domain0", "domain1"), "tokens"),
        "standing_committee": (committee, "sequences"),  # one unit (the last prompt token) per sequence
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def warm_up() -> None:
    """Compile (or load from numba's disk cache) every kernel on a tiny trace, so no score pays for it."""
    tiny = A.synthetic(2000, 2, 8, 2, seed=1, seq_len=300)
    for spec in A.SCORES.values():
        if spec.name not in ("run_agreement", "token_map", "expert_map"):
            spec.function(tiny, **PARAMS.get(spec.name, {}))
    A.expert_map(tiny)
    A.sch(tiny, level="model")


def bench_config(name: str, E: int, k: int, n_tokens: int, n_layers: int, ref_seqs: int, tmp: Path) -> dict[str, Any]:
    print(f"\n== {name}: {n_tokens:,} tokens × {n_layers} layers", flush=True)
    gen_s, data = timed(lambda: A.synthetic(n_tokens, n_layers, E, k, seed=0, seq_len=SEQ_LEN))
    store = TraceStore(tmp / f"bench_{E}_{k}.duckdb")
    write_s, run = timed(lambda: A.write_run(store, data, chunk_tokens=1 << 17))
    A.clear_cache()
    load_s, loaded = timed(lambda: RoutingData.from_store(store, run))
    cached_s, _ = timed(lambda: RoutingData.from_store(store, run))
    assert np.array_equal(loaded.experts, data.experts)
    del data
    rows = int((loaded.top_k[:, None] > np.arange(loaded.k_max)).sum() * loaded.n_tokens)
    print(f"synthetic {gen_s:.1f}s, write {write_s:.1f}s, load {load_s:.2f}s ({rows / load_s / 1e6:.1f}M rows/s), cached {cached_s * 1e3:.1f} ms", flush=True)

    other = dataclasses.replace(loaded, experts=np.roll(loaded.experts, 1, axis=1), _lazy={})
    scores: dict[str, dict[str, Any]] = {}
    for spec in A.SCORES.values():
        if spec.name == "token_map":
            continue
        if spec.name == "run_agreement":
            seconds, df = timed(lambda: A.run_agreement(loaded, None, other))
        else:
            seconds, df = timed(lambda spec=spec: A.run_score(store, run, spec.name, **PARAMS.get(spec.name, {})))
        note = df.attrs["params"].get("sampled", "")
        scores[spec.name] = {"seconds": seconds, "note": note}
        print(f"{spec.name:28s} {seconds:7.2f}s {note}", flush=True)

    seq_ids = sample_sequences(loaded, ref_seqs)
    trace = to_trace(loaded, seq_ids, [0, 1])
    other_trace = to_trace(other, seq_ids, [0, 1])
    n_sequences = len(np.unique(loaded.seq_id))
    scale = {"tokens": loaded.n_tokens / sum(len(s) for s in trace.seqs), "sequences": n_sequences / len(seq_ids)}
    for score, (call, grows_with) in reference_calls(trace, other_trace).items():
        seconds, _ = timed(call)
        scores[score]["reference"] = seconds * scale[grows_with] * loaded.n_layers
        print(f"reference {score:28s} {seconds:6.2f}s on {len(seq_ids)} sequences × 1 layer → {scores[score]['reference']:9.0f}s extrapolated", flush=True)
    return {
        "name": name, "E": E, "k": k, "tokens": loaded.n_tokens, "layers": loaded.n_layers, "rows": rows,
        "generate": gen_s, "write": write_s, "load": load_s, "cached": cached_s, "scores": scores,
        "ref_tokens": sum(len(s) for s in trace.seqs), "ref_sequences": len(seq_ids),
    }  # fmt: skip


def markdown(results: list[dict[str, Any]], ref_seqs: int) -> str:
    load = os.getloadavg()
    lines = [
        "# moelens.analysis benchmark",
        "",
        f"`python benchmarks/analysis.py` on {platform.machine()} Linux, {os.cpu_count()} cores (shared with other "
        f"work: load average {load[0]:.1f} at the end), Python {platform.python_version()}, numpy {np.__version__}.",
        f"Synthetic traces (`moelens.analysis.synthetic`, seed 0, sequences of {SEQ_LEN} tokens, 4 labels) written to a "
        "temporary DuckDB store with `write_run`; every score runs through `run_score(store, run, ...)` on the cached "
        "load with default parameters (numba kernels compiled beforehand; threads = cores for SRP/SCH).",
        "",
        f"**Reference** = the simple per-token implementation of `tests/analysis_reference.py`, timed on the first "
        f"{ref_seqs} sequences of every label and one layer and **extrapolated linearly** to all tokens and layers "
        "(not run at full size). Ratio = reference / moelens. `token_map` is not timed (the synthetic runs have no "
        "router logits).",
        "",
    ]
    for r in results:
        lines += [
            f"## {r['name']}: {r['tokens']:,} tokens × {r['layers']} layers ({r['rows'] / 1e6:.1f}M routing rows)",
            "",
            f"Generate {r['generate']:.1f} s · write to DuckDB {r['write']:.1f} s · **load `from_store` {r['load']:.2f} s** "
            f"({r['rows'] / r['load'] / 1e6:.1f}M rows/s) · cached load {r['cached'] * 1e3:.1f} ms · reference subsample "
            f"{r['ref_sequences']} sequences = {r['ref_tokens']:,} tokens",
            "",
            "| score | moelens (s) | reference, extrapolated (s) | ratio | note |",
            "|---|---:|---:|---:|---|",
        ]
        for score, s in r["scores"].items():
            refs = s.get("reference")
            ratio = f"{refs / s['seconds']:,.0f}×" if refs is not None else "—"
            shown = f"{refs:,.1f}" if refs is not None else "—"
            lines.append(f"| {score} | {s['seconds']:.2f} | {shown} | {ratio} | {s['note']} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--ref-sequences", type=int, default=2, help="sequences per label the reference runs on")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "analysis.md")
    args = parser.parse_args()
    warm_up()
    results = []
    with tempfile.TemporaryDirectory(prefix="moelens-bench-") as tmp:
        for name in args.configs:
            E, k = CONFIGS[name]
            results.append(bench_config(name, E, k, args.tokens, args.layers, args.ref_sequences, Path(tmp)))
            A.clear_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results, args.ref_sequences) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
