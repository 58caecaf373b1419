"""Prune the bundled demo model by REAP, EAN, frequency and EASY-EP and compare with random prunings.

Calibration: record one half of the held-out documents of every domain with expert contributions. Evaluation:
the other half (disjoint documents), teacher-forced loss per domain, unpruned vs each score's pruning vs
``--n-random`` random prunings with the same number of experts per layer (mean ± std), at keep 75 % and 50 %.
Every pruning is applied as reroute steering, which the tests show equals the written pruned checkpoint.

Writes benchmarks/results/prune_demo.md. Run: OMP_NUM_THREADS=1 python benchmarks/prune_demo.py [--tokens 3000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from steering_demo import split_heldout

from moelens.demo import DEMO_MODEL_DIR
from moelens.pruning.evaluate import evaluate_pruning, markdown_table
from moelens.recording.loading import load_model
from moelens.recording.record import record
from moelens.store import TraceStore

RESULTS = Path(__file__).parent / "results" / "prune_demo.md"
SCORES = ("reap", "ean", "frequency", "easy_ep")
KEEPS = (0.75, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3000, help="tokens per domain on each side")
    parser.add_argument("--n-random", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(str(DEMO_MODEL_DIR), dtype="float32")
    calibration, evaluation = split_heldout(tokenizer, args.tokens)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(Path(tmp) / "calib.duckdb")
        run = record(model, tokenizer, calibration, store=store, contributions=True, seq_len=256, progress=False)
        recorded = time.perf_counter() - started
        result = evaluate_pruning(model, tokenizer, store, run, evaluation, scores=SCORES, keep=KEEPS,
                                  n_random=args.n_random, seq_len=256)
    elapsed = time.perf_counter() - started
    n_eval = int(result.loc[result["label"] == "all", "n_tokens"].iloc[0])
    lines = [
        "# Pruning the demo model: importance scores vs random prunings", "",
        f"Held-out loss (nats/token) per domain. Calibration: {args.tokens} tokens per domain of one half of the "
        f"held-out documents (recorded with contributions); evaluation: {n_eval} predicted tokens from the other half. "
        f"Random: mean ± std over {args.n_random} random prunings with the same experts per layer. Uniform pruning "
        "(same count per layer), applied as reroute steering (= the pruned checkpoint). "
        f"CPU, 1 thread, {elapsed:.0f} s in all ({recorded:.0f} s recording).", "",
    ]
    for keep in KEEPS:
        lines += [markdown_table(result, keep), ""]
    text = "\n".join(lines)
    print(text)
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
