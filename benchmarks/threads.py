"""torch intra-op threads on a small machine: recording and generation time with 1, 2, ... threads.

Each measurement is a fresh process (``--child``) that sets its thread count through ``MOELENS_THREADS`` (the
policy in ``moelens.threads``), loads the bundled demo model with ``moelens.load``, records ``--tokens`` held-out
tokens into a scratch store (batch 8 x 256, as ``moelens demo`` does) and then generates 32 greedy tokens from one
prompt (what one Generate click on the Steer page costs), first on the machine as it is, then with one more
CPU-bound process (a pure-Python loop) next to it, as a browser, the Streamlit server or a second recording adds. Thread counts alternate within each
repetition so that drift hits all of them; the table shows medians.

Writes benchmarks/results/threads.md. Run: python benchmarks/threads.py [--tokens 20000] [--threads 1 2] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "threads.md"
PROMPT = "The Python Software Foundation is"
AS_IS, BUSY = "as is", "+1 busy process"


def child(tokens: int) -> dict[str, float]:
    """One measurement in this process (its thread count comes from $MOELENS_THREADS)."""
    import torch

    import moelens
    from moelens.demo import DEMO_MODEL_DIR, load_corpus

    model, tokenizer = moelens.load(DEMO_MODEL_DIR, dtype="float32")
    docs = [{"text": d["text"], "label": d["domain"]} for d in load_corpus("heldout")]
    with tempfile.TemporaryDirectory() as tmp:
        store = moelens.TraceStore(Path(tmp) / "threads.duckdb")
        start = time.perf_counter()
        moelens.record(model, tokenizer, docs, store=store, seq_len=256, batch_size=8, max_tokens=tokens, progress=False)
        record_s = time.perf_counter() - start
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        generate_s = time.perf_counter() - start
    return {"threads": torch.get_num_threads(), "record_s": record_s, "generate_s": generate_s}


def measure(threads: int, tokens: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["MOELENS_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, __file__, "--child", "--tokens", str(tokens)], env=env, check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["threads"] == threads, result
    return result


def run(threads: list[int], tokens: int, reps: int) -> list[dict]:
    rows = []
    for load in (AS_IS, BUSY):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == BUSY else None
        try:
            load_avg = os.getloadavg()[0]
            runs: dict[int, list[dict]] = {n: [] for n in threads}
            for rep in range(reps):
                for n in threads if rep % 2 == 0 else threads[::-1]:
                    runs[n].append(measure(n, tokens))
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
        for n in threads:
            rows.append({"load": load, "threads": n, "load_avg": load_avg,
                         "record_s": statistics.median(r["record_s"] for r in runs[n]),
                         "generate_s": statistics.median(r["generate_s"] for r in runs[n])})
    return rows


def report(rows: list[dict], tokens: int, reps: int) -> str:
    import torch

    from moelens.threads import available_cores, default_threads

    cores = available_cores()
    lines = [
        "# torch threads: recording and generation on the demo model", "",
        f"{cores} cores, torch {torch.__version__}, demo model (float32), {tokens:,} held-out tokens recorded at "
        f"batch 8 x 256, then 32 greedy tokens generated; median of {reps} fresh processes per cell. "
        f"\"{BUSY}\": one more CPU-bound process (a pure-Python loop) runs alongside. load avg: the 1-minute load "
        "average when the condition started (other work on the machine counts too).", "",
        "| load | threads | load avg | record s | tokens/s | generate 32 tokens s | record vs 1 thread |",
        "|---|---|---|---|---|---|---|",
    ]
    one = {r["load"]: r for r in rows if r["threads"] == 1}
    for r in rows:
        ratio = r["record_s"] / one[r["load"]]["record_s"] if r["load"] in one else float("nan")
        lines.append(f"| {r['load']} | {r['threads']} | {r['load_avg']:.2f} | {r['record_s']:.2f} | "
                     f"{tokens / r['record_s']:,.0f} | {r['generate_s']:.2f} | {ratio:.2f}x |")
    lines += ["", f"moelens' default on this machine: {default_threads(cores)} thread(s) "
              "(1 on <= 2 cores, else half the cores, at most 8; override with MOELENS_THREADS or --threads)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.tokens)))
        return
    rows = run(args.threads, args.tokens, args.reps)
    text = report(rows, args.tokens, args.reps)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
