"""Recording overhead and store write throughput.

(1) recorded / plain forward time on a 4-layer, 16-expert, top-2 model (OLMoE architecture, hidden 128,
    the demo model's shape) at batch 8 x 256 tokens, CPU, 1 thread. Plain and recorded forwards alternate
    so drift hits both; the median of each is compared. "recorded" = forward with the capture hooks plus
    turning the calls into store columns (everything but the DuckDB write, measured in (2)).
(2) routing rows/s appended to a DuckDB trace store for 1M tokens x 16 layers x top-2 (32M rows), in the
    recorder's flush chunks.

Writes benchmarks/results/record_overhead.md. Run: python benchmarks/record_overhead.py [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moelens.adapters import RoutingCapture, find_routers
from moelens.recording.batch import RowMap, routing_columns
from moelens.recording.writer import RunWriter
from moelens.store import TraceStore
from moelens.tiny import tiny_model

RESULTS = Path(__file__).parent / "results" / "record_overhead.md"


#: The issue's shape (the demo model's) and a larger one for accelerators, where small models are launch-bound.
SHAPES = {
    "demo": dict(batch=8, seq=256, model=dict(num_hidden_layers=4, num_experts=16, num_experts_per_tok=2, hidden_size=128,
                                               intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                                               vocab_size=4096)),
    "large": dict(batch=8, seq=1024, model=dict(num_hidden_layers=8, num_experts=64, num_experts_per_tok=8, hidden_size=1024,
                                                intermediate_size=512, num_attention_heads=16, num_key_value_heads=16,
                                                vocab_size=32000)),
}


def forward_overhead(device: str, reps: int, shape: str = "demo", dtype: str = "float32") -> dict[str, float]:
    spec = SHAPES[shape]
    batch, seq = spec["batch"], spec["seq"]
    model, _ = tiny_model("olmoe", dtype=getattr(torch, dtype), **spec["model"])
    model = model.to(device)
    info = find_routers(model)
    ids = torch.randint(2, model.config.vocab_size, (batch, seq), device=device)
    rows = RowMap(seq_id=np.repeat(np.arange(batch, dtype=np.int32), seq), pos=np.tile(np.arange(seq, dtype=np.int32), batch),
                  keep=np.ones(batch * seq, dtype=bool))

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain() -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=False)
        sync()
        return time.perf_counter() - t

    def recorded(capture: RoutingCapture) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model(ids, use_cache=False)
        rows.offsets.clear()
        routing_columns(capture.pop(), rows)
        capture.contribution_columns(rows)
        sync()
        return time.perf_counter() - t

    for _ in range(3):  # warm-up
        plain()
        with RoutingCapture(model, info) as capture:
            recorded(capture)
    plain_t, rec_t, contrib_t = [], [], []
    for _ in range(reps):
        plain_t.append(plain())
        with RoutingCapture(model, info) as capture:
            rec_t.append(recorded(capture))
        with RoutingCapture(model, info, contributions=True) as capture:
            contrib_t.append(recorded(capture))
    base = statistics.median(plain_t)
    return {"plain_ms": base * 1e3, "recorded_ms": statistics.median(rec_t) * 1e3,
            "ratio": statistics.median(rec_t) / base, "contrib_ms": statistics.median(contrib_t) * 1e3,
            "contrib_ratio": statistics.median(contrib_t) / base}


def write_throughput(n_tokens: int = 1_000_000, n_layers: int = 16, k: int = 2, n_experts: int = 16,
                     flush_tokens: int = 65_536) -> dict[str, float]:
    rng = np.random.default_rng(0)
    seq_len = 512
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(Path(tmp) / "bench.duckdb")
        run = store.create_run("synthetic")
        writer = RunWriter(store, run, flush_tokens=flush_tokens)
        chunk = flush_tokens
        started = time.perf_counter()
        for start in range(0, n_tokens, chunk):
            n = min(chunk, n_tokens - start)
            tok = np.arange(start, start + n)
            seq = (tok // seq_len).astype(np.int32)
            pos = (tok % seq_len).astype(np.int32)
            rows = n * n_layers * k
            routing = {
                "seq_id": np.repeat(np.tile(seq, n_layers), k),
                "pos": np.repeat(np.tile(pos, n_layers), k),
                "layer": np.repeat(np.arange(n_layers, dtype=np.int16), n * k),
                "rank": np.tile(np.arange(k, dtype=np.uint8), n * n_layers),
                "expert": rng.integers(0, n_experts, rows, dtype=np.int16),
                "weight": rng.random(rows, dtype=np.float32),
            }
            writer.add({"routing": routing}, n_tokens=n, n_sequences=0)
        writer.flush()
        elapsed = time.perf_counter() - started
        stored = store.query("SELECT count(*) AS n FROM routing")["n"][0]
        size_mb = store.path.stat().st_size / 2**20
    return {"rows": int(stored), "seconds": elapsed, "rows_per_s": stored / elapsed, "file_mb": size_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-write", action="store_true")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fwd = forward_overhead(args.device, args.reps, args.shape, args.dtype)
    m, b = SHAPES[args.shape]["model"], SHAPES[args.shape]
    lines = [
        "# Recording overhead", "",
        f"device {args.device}, {args.dtype}, torch threads {args.threads}, torch {torch.__version__}, "
        f"{args.reps} alternating reps (median)", "",
        "| measure | value | goal |", "|---|---|---|",
        f"| plain forward, {m['num_hidden_layers']} layers x {m['num_experts']} experts top-{m['num_experts_per_tok']}, "
        f"hidden {m['hidden_size']}, batch {b['batch']} x {b['seq']} | {fwd['plain_ms']:.2f} ms | |",
        f"| recorded forward (hooks + store columns) | {fwd['recorded_ms']:.2f} ms | |",
        f"| **ratio recorded / plain** | **{fwd['ratio']:.3f}** | <= 1.05 |",
        f"| recorded with `contributions=True` (expert output norms recomputed, residual cosines) | "
        f"{fwd['contrib_ms']:.2f} ms | |",
        f"| **ratio contributions / plain** | **{fwd['contrib_ratio']:.3f}** | one extra experts pass |",
    ]
    if not args.skip_write:
        wr = write_throughput()
        lines += [
            f"| routing rows written to DuckDB (1M tokens x 16 layers x top-2) | {wr['rows']:,} rows in {wr['seconds']:.2f} s | |",
            f"| **rows/s** | **{wr['rows_per_s'] / 1e6:.2f} M** | >= 5 M |",
            f"| store file size | {wr['file_mb']:.0f} MB ({wr['file_mb'] * 2**20 / wr['rows']:.2f} bytes/row) | |",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    suffix = "" if (args.device, args.shape) == ("cpu", "demo") else f"_{args.device.replace(':', '')}_{args.shape}_{args.dtype}"
    out = RESULTS.with_name(f"record_overhead{suffix}.md")
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
