"""The scores that finish from a run's derived summaries: wall time streamed (no summaries) against finished
from the summaries (``max_pass_slots=0``: refused if a pass were needed), on one synthetic run of the
Qwen3-30B-A3B shape (48 MoE layers × 128 experts, top-8) in a temporary DuckDB store.

    python benchmarks/summary_finishes.py --log2-tokens 16     # writes benchmarks/results/summary_finishes.md
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import moelens.analysis as A  # noqa: E402
from moelens import TraceStore  # noqa: E402
from moelens.analysis.summaries import summarize  # noqa: E402

CASES = [
    ("domain_summary", {}), ("repetition", {"permutation": False, "by_label": True}), ("npmi", {"label": "domain1"}),
    ("npmi", {"tokens": [5, 7, 11]}), ("npmi", {"regex": "^t1"}), ("risk_difference", {"label_a": "domain0", "label_b": "domain1"}),
    ("standing_committee", {}), ("committee_share", {}), ("cross_layer_consistency", {}),
    ("expert_top_tokens", {"layer": 3, "expert": 5, "n": 20, "n_contexts": 3}),
]  # fmt: skip


def timed(fn, *args, **kwargs) -> float:
    A.clear_cache()
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "summary_finishes.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(Path(tmp) / "run.duckdb")
        data = A.synthetic(1 << args.log2_tokens, 48, 128, 8, seed=1, seq_len=512, n_labels=4, vocab_size=32000, generated_fraction=0.25)
        run = A.write_run(store, data)
        del data
        streamed = [timed(A.SCORES[name].function, store, run, **params) for name, params in CASES]
        build = timed(summarize, store, run)
        finished = [timed(A.SCORES[name].function, store, run, max_pass_slots=0, **params) for name, params in CASES]
    load = os.getloadavg()[0]
    lines = [f"# Scores finished from derived summaries vs streamed (2^{args.log2_tokens} tokens × 48 × 128 × top-8)", "",
             f"One run of `python benchmarks/summary_finishes.py --log2-tokens {args.log2_tokens}`, 1 numpy thread, "
             f"load average {load:.1f} on {os.cpu_count()} cores. `summarize` took {build:.1f} s.", "",
             "| score | parameters | streamed s | from summaries s | ratio |", "|---|---|---|---|---|"]
    for (name, params), a, b in zip(CASES, streamed, finished):
        lines.append(f"| {name} | {params} | {a:.2f} | {b:.2f} | {a / b:.1f}× |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
