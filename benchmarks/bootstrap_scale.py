"""Bootstrap intervals at scale: peak RSS and wall time of ``bootstrap("sch" | "risk_difference", store, 1)`` on
a 1M-token (2^20) 48 × 128 × top-8 run, streamed (sequence partials added into every draw over bounded passes,
`moelens.analysis.bootstrap.Resampled`) versus the route that loads the run and recomputes the score on every
materialised draw (what every bootstrap on a store did before; still the route of the scores whose partial is
no sum over sequences, e.g. permutation baselines and paired runs).

Each measurement runs alone in a fresh interpreter (peak RSS = its ``VmHWM``), one numpy/BLAS thread, the store
opened read-only; the machine load (``uptime``) is noted before each. The loaded route is slow (a copy of the
run and a full recompute per draw), so it is measured with few draws and its per-draw time extrapolated.

    python benchmarks/bootstrap_scale.py --db /work/bench/1m.duckdb     # writes benchmarks/results/bootstrap_scale.md
    python benchmarks/bootstrap_scale.py --db small.duckdb --n-boot 20 --loaded-n-boot 2 --out /tmp/b.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import numpy as np
from moelens import TraceStore
from moelens.analysis import RoutingData
from moelens.analysis.bootstrap import VALUES, bootstrap, resample_sequences
from moelens.analysis.registry import SCORES
store, params, value = TraceStore(args["db"], read_only=True), args["params"], VALUES[args["score"]][0]
score = SCORES[args["score"]].function
t0 = time.perf_counter()
out = {}
if args["route"] == "streamed":
    df = bootstrap(args["score"], store, 1, n_boot=args["n_boot"], **params)
    out["mean_width"] = float((df[value + "_hi"] - df[value + "_lo"]).mean())
    out["bootstrap_ci"] = df.attrs["params"]["bootstrap_ci"]
else:  # the run in memory, the score recomputed on every materialised draw
    data = RoutingData.from_store(store, 1)
    out["load_s"] = time.perf_counter() - t0
    score(data, **params)
    out["point_s"] = time.perf_counter() - t0 - out["load_s"]
    rng = np.random.default_rng(0)
    draws = [score(resample_sequences(data, rng), **params) for _ in range(args["n_boot"])]
out["wall"] = time.perf_counter() - t0
# VmHWM: the peak RSS of this process's own memory (ru_maxrss would carry the parent's over fork + exec)
out["rss_gib"] = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 2**20
print(json.dumps(out))
"""


def measure(args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One measurement in a fresh interpreter, with the load average just before it."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "load": load}
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:160], "load": load}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load": load}


def run_shape(db: str) -> dict[str, Any]:
    from moelens import TraceStore

    store = TraceStore(db, read_only=True)
    seqs = store.query("SELECT label, count(*) AS n, sum(n_tokens) AS tokens FROM sequences WHERE run_id = 1 GROUP BY label ORDER BY label")
    lay = store.layers(1)
    return {"labels": seqs, "n_layers": len(lay), "n_experts": int(lay["n_experts"].max()), "top_k": int(lay["top_k"].max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default="/work/bench/1m.duckdb", help="a store whose run 1 has at least two labels")
    ap.add_argument("--n-boot", type=int, default=200, help="draws of the streamed bootstraps")
    ap.add_argument("--loaded-n-boot", type=int, default=5, help="draws of the loaded route (its per-draw time is extrapolated)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bootstrap_scale.md"))
    opts = ap.parse_args()
    shape = run_shape(opts.db)
    labels = shape["labels"]["label"].tolist()
    cases = {"sch": {}, "risk_difference": {"label_a": labels[0], "label_b": labels[1]}}
    rows = []
    for name, params in cases.items():
        for route, n_boot in (("streamed", opts.n_boot), ("loaded", opts.loaded_n_boot)):
            got = measure({"db": opts.db, "score": name, "params": params, "route": route, "n_boot": n_boot}, opts.timeout)
            print(name, route, n_boot, got, flush=True)
            rows.append((name, route, n_boot, got))
    Path(opts.out).write_text(report(opts, shape, cases, rows))
    print(f"wrote {opts.out}")


def report(opts: argparse.Namespace, shape: dict[str, Any], cases: dict[str, dict], rows: list) -> str:
    tokens = int(shape["labels"]["tokens"].sum())
    n_seq = int(shape["labels"]["n"].sum())
    lines = [
        "# Bootstrap intervals at scale: streamed sequence partials vs the loaded run",
        "",
        f"Run: {tokens:,} tokens in {n_seq:,} sequences, {shape['n_layers']} layers × {shape['n_experts']} experts, "
        f"top-{shape['top_k']} (`{opts.db}`, opened read-only, no derived summaries unless the store has them). "
        "Produced by `benchmarks/bootstrap_scale.py`; each row is a fresh interpreter (peak RSS = its VmHWM), "
        "one numpy/BLAS thread, run one at a time on the shared 2-core machine (load average before each row).",
        "",
        "- **streamed**: `bootstrap(name, store, 1, n_boot=N, ...)` — the seeded draw counts fixed up front, each "
        "sequence's partial mapped once and added into every draw (a few passes only when the draws' partials "
        "exceed `DRAW_BUDGET_BYTES`), then one finish per draw. Includes the point estimate's own pass.",
        "- **loaded**: `RoutingData.from_store(store, 1)`, the score on it, then the score recomputed on each "
        "materialised draw (`resample_sequences`) — the old route. Measured with few draws; `per draw` is "
        "(wall − load − point) / draws and `at N` extrapolates load + point + N draws.",
        "",
        "Parameters: " + "; ".join(f"`{n}` {p or 'defaults'}" for n, p in cases.items()) + ".",
        "",
        "| score | route | draws | wall (s) | peak RSS (GiB) | load (s) | per draw (s) | at N draws (s, est.) | load avg before |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, route, n_boot, got in rows:
        if "error" in got:
            lines.append(f"| {name} | {route} | {n_boot} | {got['error']} | | | | | {' '.join(got['load'])} |")
            continue
        per = est = load = ""
        if route == "loaded":
            per_draw = (got["wall"] - got["load_s"] - got["point_s"]) / n_boot
            per, load = f"{per_draw:.2f}", f"{got['load_s']:.1f}"
            est = f"{got['load_s'] + got['point_s'] + per_draw * opts.n_boot:.0f}"
        lines.append(f"| {name} | {route} | {n_boot} | {got['wall']:.1f} | {got['rss_gib']:.2f} | {load} | {per} | {est} | {' '.join(got['load'])} |")
    ok = {(name, route): (n_boot, got) for name, route, n_boot, got in rows if "error" not in got}
    lines += ["", f"Streamed vs loaded at {opts.n_boot} draws (the loaded route extrapolated from its measured draws):", ""]
    for name in cases:
        if (name, "streamed") in ok and (name, "loaded") in ok:
            (_, fast), (n, slow) = ok[(name, "streamed")], ok[(name, "loaded")]
            at_n = slow["load_s"] + slow["point_s"] + (slow["wall"] - slow["load_s"] - slow["point_s"]) / n * opts.n_boot
            lines.append(f"- `{name}`: {at_n / fast['wall']:.0f}× less wall time, {slow['rss_gib'] / fast['rss_gib']:.1f}× less peak RSS "
                         f"({fast['rss_gib']:.2f} vs {slow['rss_gib']:.2f} GiB; the loaded peak is the run plus one draw's copy, "
                         "whatever the number of draws).")
    lines += ["", "Intervals (streamed rows):", ""]
    lines += [f"- `{name}`: mean interval width {got['mean_width']:.4g}; {got['bootstrap_ci']}"
              for name, route, _, got in rows if route == "streamed" and "error" not in got]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
