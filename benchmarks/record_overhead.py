"""Recording overhead and store write throughput.

(1) recorded / plain forward time on a 4-layer, 16-expert, top-2 model (OLMoE architecture, hidden 128,
    the demo model's shape) at batch 8 x 256 tokens, CPU, 1 thread. Plain and recorded forwards alternate
    so drift hits both; the median of each is compared. "recorded" = forward with the capture hooks plus
    turning the calls into store columns (everything but the DuckDB write, measured in (2)).
(2) routing rows/s appended to a DuckDB trace store for 1M tokens x 16 layers x top-2 (32M rows), in the
    recorder's flush chunks.
(3) `record()`'s loop (forward, non-blocking host copies, columns, buffered rows) over 4 batches of that shape,
    with the writer thread (``max_pending=2``) and inline (``max_pending=0``), alternating with plain forwards;
    and the fixed cost of a run (creating it, its DuckDB connections), from a one-token `record()`.
(4) batched generation: generated tokens/s of ``record(generate=N, batch_size=B)`` for B = 1, 4, 8, 16 on the
    bundled demo model and a tiny Mixtral, next to plain ``generate`` at the same batch size.

Writes benchmarks/results/record_overhead.md. Run: python benchmarks/record_overhead.py [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moelens.adapters import RoutingCapture, find_routers
from moelens.recording.batch import RowMap, routing_columns
from moelens.recording.record import _forward, left_padded, record
from moelens.recording.tokenize import make_chunk
from moelens.recording.writer import BackgroundWriter, RunWriter
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


def _timed(device: str, work) -> float:
    """Seconds ``work()`` takes in inference mode, the device's queued work included."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def forward_overhead(device: str, reps: int, shape: str = "demo", dtype: str = "float32") -> dict[str, float]:
    spec = SHAPES[shape]
    batch, seq = spec["batch"], spec["seq"]
    model, _ = tiny_model("olmoe", dtype=getattr(torch, dtype), **spec["model"])
    model = model.to(device)
    info = find_routers(model)
    ids = torch.randint(2, model.config.vocab_size, (batch, seq), device=device)
    rows = RowMap(seq_id=np.repeat(np.arange(batch, dtype=np.int32), seq), pos=np.tile(np.arange(seq, dtype=np.int32), batch),
                  keep=np.ones(batch * seq, dtype=bool))

    def plain() -> float:
        return _timed(device, lambda: model(ids, use_cache=False))

    def recorded(capture: RoutingCapture) -> float:
        def work() -> None:
            model(ids, use_cache=False)
            rows.offsets.clear()
            routing_columns(capture.pop(), rows)
            capture.contribution_columns(rows)

        return _timed(device, work)

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


def pipeline_overhead(device: str, reps: int, n_batches: int = 4) -> dict[str, float]:
    """Plain forwards vs `record()`'s loop over the same batches (forward, host copies, columns and buffered
    rows; the DuckDB write is (2)), with the writer thread and inline, alternating; plus one whole `record()`
    call of a single token: the fixed cost of a run."""
    spec = SHAPES["demo"]
    batch, seq = spec["batch"], spec["seq"]
    model, _ = tiny_model("olmoe", **spec["model"])
    model = model.to(device)
    info = find_routers(model)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(2, model.config.vocab_size, (n_batches * batch, seq), generator=gen)
    device_inputs, device_mask = inputs.to(device), torch.ones(batch, seq, dtype=torch.long, device=device)
    chunks = [make_chunk(row, [None] * seq, [None] * seq, label=None, source=None) for row in inputs.tolist()]

    def plain() -> float:
        def work() -> None:
            for i in range(n_batches):  # the recorder's call: with the attention mask a padded batch needs
                model(input_ids=device_inputs[i * batch:(i + 1) * batch], attention_mask=device_mask, use_cache=False)

        return _timed(device, work)

    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(Path(tmp) / "pipeline.duckdb")
        run = store.create_run("pipeline")

        def recorded(max_pending: int) -> float:
            writer = RunWriter(store, run, flush_tokens=10**12)  # buffered only: the write is measured in (2)

            def work() -> None:
                with RoutingCapture(model, info) as capture, BackgroundWriter(writer, max_pending) as background:
                    for i in range(n_batches):
                        background.submit(_forward(model, info, capture, chunks[i * batch:(i + 1) * batch], i * batch, 0))

            return _timed(device, work)

        def whole_run() -> float:
            return _timed(device, lambda: record(model, None, [[5]], store=store, progress=False))

        for _ in range(2):  # warm-up
            plain(), recorded(0), recorded(2)
        times: dict[str, list[float]] = {"plain": [], "inline": [], "thread": [], "run": []}
        for _ in range(reps):
            times["plain"].append(plain())
            times["inline"].append(recorded(0))
            times["thread"].append(recorded(2))
            times["run"].append(whole_run())
    med = {k: statistics.median(v) for k, v in times.items()}
    return {**{f"{k}_ms": v * 1e3 for k, v in med.items()}, "inline_ratio": med["inline"] / med["plain"],
            "thread_ratio": med["thread"] / med["plain"], "n_batches": n_batches}


def _prompts(tokenizer, n: int) -> list:
    """``n`` prompts of 8..40 tokens cut from the demo's held-out corpus (different lengths: left padding)."""
    from moelens.demo import load_corpus

    texts = [doc["text"] for doc in load_corpus("heldout")[:n]]
    return [tokenizer(t, add_special_tokens=False)["input_ids"][: 8 + (i * 7) % 33] for i, t in enumerate(texts)]


def generation_throughput(device: str, n_prompts: int = 16, n_new: int = 32,
                          batch_sizes: tuple[int, ...] = (1, 4, 8, 16), reps: int = 3) -> list[dict]:
    """Generated tokens/s of recorded and of plain batched generation, per model and batch size."""
    from moelens.demo import DEMO_MODEL_DIR
    from moelens.recording.loading import load_model

    demo, demo_tok = load_model(DEMO_MODEL_DIR, dtype="float32")
    mixtral, _ = tiny_model("mixtral", vocab_size=4096, hidden_size=128, intermediate_size=128, num_hidden_layers=4)
    prompts = _prompts(demo_tok, n_prompts)  # ids below 4096 fit both models
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(Path(tmp) / "gen.duckdb")
        for name, model in (("demo (OLMoE 4 x 16 experts, top-2, hidden 128)", demo),
                            ("tiny Mixtral (4 x 8 experts, top-2, hidden 128)", mixtral)):
            model = model.to(device)
            pad = int(model.config.pad_token_id or 0)
            settings = {"max_new_tokens": n_new, "min_new_tokens": n_new}  # every row generates n_new tokens
            record(model, None, prompts[:2], store=store, generate=settings, batch_size=2, progress=False)  # warm-up
            # the fixed cost of a run (its DuckDB connections), paid once per run
            run_s = statistics.median(_timed(device, lambda: record(model, None, [[5]], store=store, progress=False))
                                      for _ in range(reps))
            for b in batch_sizes:
                rec_t, plain_t = [], []
                for _ in range(reps):  # alternating, median: one generation is short and the machine is shared
                    t = time.perf_counter()
                    run = record(model, None, prompts, store=store, generate=settings, batch_size=b, progress=False)
                    rec_t.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    with torch.inference_mode():
                        for i in range(0, len(prompts), b):
                            chunks = [make_chunk(p, [None] * len(p), [None] * len(p), label=None, source=None)
                                      for p in prompts[i:i + b]]
                            ids, mask = left_padded(chunks, pad)
                            model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                           pad_token_id=pad, **settings)
                    plain_t.append(time.perf_counter() - t)
                rec_s, plain_s = statistics.median(rec_t), statistics.median(plain_t)
                seqs = store.sequences(run)
                n_generated = int((seqs["n_tokens"] - seqs["prompt_len"]).sum())
                out.append({"model": name, "batch": b, "generated": n_generated, "recorded_tok_s": n_generated / rec_s,
                            "plain_tok_s": n_generated / plain_s, "ratio_without_run": (rec_s - run_s) / plain_s})
    return out


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
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
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
    if args.shape == "demo":
        pipe = pipeline_overhead(args.device, max(3, args.reps // 2))
        lines += [
            "", f"## `record()`'s loop, writer thread vs inline ({pipe['n_batches']} batches of "
            f"{b['batch']} x {b['seq']}; the DuckDB write is the rows/s above)", "",
            "| mode | time | ratio to plain forwards |", "|---|---|---|",
            f"| plain forwards | {pipe['plain_ms']:.1f} ms | 1 |",
            f"| `record(max_pending=0)` (columns built inline) | {pipe['inline_ms']:.1f} ms | {pipe['inline_ratio']:.3f} |",
            f"| **`record(max_pending=2)` (writer thread, default)** | {pipe['thread_ms']:.1f} ms | "
            f"**{pipe['thread_ratio']:.3f}** (goal <= 1.05) |",
            f"| fixed cost of one run (`record()` of one token: create, layers, flush, finish) | {pipe['run_ms']:.0f} ms | |",
        ]
    if not args.skip_generation:
        rows = generation_throughput(args.device)
        lines += ["", "## Batched generation (16 prompts of 8-40 tokens, 32 new tokens each, greedy; median of 3, alternating)", "",
                  "| model | batch | generated tok/s recorded | vs batch 1 | plain `generate` tok/s | recorded / plain time | "
                  "same, less the fixed cost of a run |", "|---|---|---|---|---|---|---|"]
        base = {r["model"]: r["recorded_tok_s"] for r in rows if r["batch"] == 1}
        lines += [f"| {r['model']} | {r['batch']} | {r['recorded_tok_s']:.0f} | {r['recorded_tok_s'] / base[r['model']]:.2f}x | "
                  f"{r['plain_tok_s']:.0f} | {r['plain_tok_s'] / r['recorded_tok_s']:.2f} | {r['ratio_without_run']:.2f} |"
                  for r in rows]
    lines += ["", f"load average (1, 5, 15 min) at the start: {', '.join(f'{x:.1f}' for x in load_start)}, at the end: "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}, on {os.cpu_count()} cores (shared machine)"]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    suffix = "" if (args.device, args.shape) == ("cpu", "demo") else f"_{args.device.replace(':', '')}_{args.shape}_{args.dtype}"
    out = RESULTS.with_name(f"record_overhead{suffix}.md")
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
