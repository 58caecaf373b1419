"""Workers scaling: one run recorded by 1 vs 2 Ray workers (CPU, one torch thread each), demo model.

Records ~20K tokens of the demo corpus' held-out split with `record_distributed` into a fresh Parquet dataset,
once with 1 worker and once with 2, on one local Ray instance (started once, so both settings pay the same actor
start-up). Reports the whole wall time (actors start and load the model, the driver cuts the inputs, shards are
recorded, the run is finished) and the recording phase alone (from dispatching the shards to the run being
complete), with tokens/s and the 2-worker/1-worker ratio. A single-process `record` (1 thread, no Ray) is the
baseline. Writes benchmarks/results/record_workers.md. Run: python benchmarks/record_workers.py [--tokens 20000]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import ray
import torch

from moelens.demo import DEMO_MODEL_DIR, load_corpus
from moelens.recording.distributed import record_distributed
from moelens.recording.loading import load_model
from moelens.recording.record import record
from moelens.store import TraceStore

RESULTS = Path(__file__).parent / "results" / "record_workers.md"


def distributed(texts: list[str], workers: int, tokens: int, folder: Path) -> dict:
    dispatched: list[float] = []
    start = time.perf_counter()
    run = record_distributed(str(DEMO_MODEL_DIR), texts, folder, workers=workers, max_tokens=tokens, seq_len=512,
                             batch_size=8, progress=False, on_dispatch=lambda _: dispatched.append(time.perf_counter()))
    end = time.perf_counter()
    n = int(TraceStore(folder).runs().set_index("run_id").loc[run].n_tokens)
    return {"tokens": n, "wall": end - start, "phase": end - dispatched[0]}


def single(texts: list[str], tokens: int, path: Path) -> dict:
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, tok = load_model(DEMO_MODEL_DIR)
    loaded = time.perf_counter()
    store = TraceStore(path)
    run = record(model, tok, texts, store=store, max_tokens=tokens, seq_len=512, batch_size=8, progress=False)
    end = time.perf_counter()
    return {"tokens": int(store.runs().set_index("run_id").loc[run].n_tokens), "wall": end - start, "phase": end - loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    args = parser.parse_args()
    texts = [d["text"] for d in load_corpus("heldout")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base = single(texts, args.tokens, Path(tmp) / "single.duckdb")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            results = {w: distributed(texts, w, args.tokens, Path(tmp) / f"ds{w}") for w in (1, 2)}
        finally:
            ray.shutdown()
    load_after = os.getloadavg()
    rows = [("1 process, no Ray", base), *((f"{w} Ray worker{'s' if w > 1 else ''}", r) for w, r in results.items())]
    lines = [
        "# Recording with many workers: 1 → 2 Ray workers on CPU",
        "",
        f"The bundled demo model, {results[1]['tokens']} tokens of the held-out demo corpus, sequences of at most "
        "512 tokens, batch 8, one torch thread per worker, fresh Parquet dataset per setting; local Ray with 2 CPUs.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1-minute). Driver peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (actors are separate processes, not counted).",
        "",
        "| setting | tokens | wall s (all) | tokens/s (all) | recording phase s | tokens/s (phase) |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {r['tokens']} | {r['wall']:.1f} | {r['tokens'] / r['wall']:.0f} | {r['phase']:.1f} | "
          f"{r['tokens'] / r['phase']:.0f} |" for name, r in rows),
        "",
        f"2 workers / 1 worker tokens/s: **{results[1]['wall'] / results[2]['wall']:.2f}x** over the whole command, "
        f"**{results[1]['phase'] / results[2]['phase']:.2f}x** over the recording phase.",
        "",
        "'all' includes starting the actors and loading the model in each (and, for the single process, loading it once); "
        "'recording phase' is from sending the shards to the run being complete (single process: after loading).",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
