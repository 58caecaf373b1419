"""Scale benchmark of the chunked scores: synthetic traces of the Qwen3-30B-A3B shape (48 MoE layers × 128
experts, top-8) at 0.25M, 1M and 4M tokens (M = 2^20) in a temporary DuckDB store.

For every score: peak RSS (each score runs in a fresh subprocess; its ``VmHWM``) and wall time, streamed
from the store in bounded batches (no derived summaries present), then `summarize` and the scores that
finish from summaries; plain DuckDB SQL for expert load, co-activation pairs and transitions (same
numbers, as a ratio); and the Ray engine with 2 local workers on the 1M-token Parquet dataset against the
in-process engine on the same dataset. Everything runs with one numpy/BLAS thread (OMP_NUM_THREADS=1).

    python benchmarks/analysis_scale.py                        # 0.25M, 1M, 4M; writes benchmarks/results/analysis_scale.md
    python benchmarks/analysis_scale.py --sizes 0.25 1         # only these sizes (M tokens)
    python benchmarks/analysis_scale.py --sizes 0.01 --smoke   # a quick check of the script
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LAYERS, EXPERTS, TOP_K, SEQ_LEN = 48, 128, 8, 512
CHUNK = 1 << 16  # tokens generated and appended at a time (bounded memory while writing)
DISTINCT = 2  # distinct generated chunks

#: score -> parameters (defaults otherwise).
SCORES: dict[str, dict[str, Any]] = {
    "expert_load": {}, "layer_balance": {}, "domain_specialization": {}, "domain_summary": {},
    "vocabulary_specialization": {}, "vocabulary_by_expert": {}, "expert_top_tokens": {"layer": 20, "expert": 5},
    "coactivation": {}, "cross_layer_transitions": {}, "cross_layer_consistency": {}, "repetition": {}, "srp": {},
    "sch": {}, "run_agreement": {"run_b": "SELF"}, "standing_committee": {}, "committee_share": {},
    "npmi": {"tokens": [1, 2, 3]}, "npmi_combined": {"targets": [[1, {"tokens": [1]}], [-1, {"label": "domain1"}]]},
    "risk_difference": {"label_a": "domain0", "label_b": "domain1"}, "expert_map": {}, "experts_per_token": {},
    "frequency": {},
}  # fmt: skip
#: Not measured: they read what a synthetic trace has none of (router logits: token_map, router_stats,
#: router_token_stats; expert output norms: reap, ean, man, easy_ep, esft; shared-expert gates: shared_expert_stats).
FROM_SUMMARIES = ("expert_load", "layer_balance", "domain_specialization", "coactivation", "cross_layer_transitions", "vocabulary_specialization")

SQL = {
    "expert load": "SELECT layer, expert, count(*) AS n, sum(weight) AS mass FROM routing WHERE run_id = 1 AND expert >= 0 AND weight <> 0 GROUP BY ALL",
    "co-activation pairs": (
        "SELECT a.layer, a.expert AS i, b.expert AS j, count(*) AS n FROM routing a JOIN routing b "
        "ON a.run_id = b.run_id AND a.seq_id = b.seq_id AND a.pos = b.pos AND a.layer = b.layer AND a.rank < b.rank "
        "WHERE a.run_id = 1 AND a.expert >= 0 AND b.expert >= 0 AND a.weight <> 0 AND b.weight <> 0 GROUP BY ALL"
    ),
    "transitions": (
        "SELECT a.layer, a.expert, b.expert AS next_expert, count(*) AS n FROM routing a JOIN routing b "
        "ON a.run_id = b.run_id AND a.seq_id = b.seq_id AND a.pos = b.pos AND b.layer = a.layer + 1 "
        "WHERE a.run_id = 1 AND a.rank = 0 AND b.rank = 0 AND a.expert >= 0 AND b.expert >= 0 AND a.weight <> 0 AND b.weight <> 0 GROUP BY ALL"
    ),
}
SQL_TWIN = {"expert load": "expert_load", "co-activation pairs": "coactivation", "transitions": "cross_layer_transitions"}

CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
if args["kind"] in ("score", "loaded"):
    import moelens.analysis as A
    from moelens import TraceStore
    store = TraceStore(args["db"], read_only=True)
if args.get("score") == "expert_map":  # umap-learn's numba code is compiled per process (~40 s, not cached on
    import numpy as np                   # disk): compile it on a throwaway fit (> 4096 points: the same code paths)
    from moelens.analysis.maps import _umap
    _umap(np.random.default_rng(0).random((4200, 4)), 0, "hellinger", 15, 0.1)
t0 = time.perf_counter()  # after the imports: the score's own time (compiled kernels load from numba's disk cache)
if args["kind"] == "score":
    params = args["params"]
    if args.get("ray"):
        import ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        params["engine"] = "ray"
        t0 = time.perf_counter()
    df = A.run_score(store, 1, args["score"], **params)
    rows = len(df)
elif args["kind"] == "loaded":  # the whole run loaded into one RoutingData, as before streaming (a label: selected)
    data = A.RoutingData.from_store(store, 1)
    label = args["params"].pop("only_label", None)
    if label is not None:
        data = data.select(data.label == data.label_names.index(label))
    rows = len(A.SCORES[args["score"]].function(data, **args["params"]))
elif args["kind"] == "summarize":
    from moelens import TraceStore
    from moelens.analysis.summaries import summarize
    rows = sum(t.num_rows for t in summarize(TraceStore(args["db"]), 1).values())
else:
    import duckdb
    con = duckdb.connect(args["db"], read_only=True)
    con.execute("SET memory_limit = '6GB'")
    rows = len(con.sql(args["sql"]).fetchall())
wall = time.perf_counter() - t0
# VmHWM: the peak RSS of this process's own memory (ru_maxrss would carry the parent's over fork + exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"wall": wall, "rss_gib": hwm / 2**20, "rows": rows}))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip


def child(args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; {"error": ...} when it fails or times out."""
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_store(db: Path, n_tokens: int) -> float:
    """A synthetic run of ``n_tokens``: `DISTINCT` generated chunks of `CHUNK` tokens, appended in turn with
    continuing sequence ids (generating 48 × 128 routing costs more than writing it, so chunks repeat)."""
    import moelens.analysis as A
    from moelens import TraceStore
    from moelens.analysis.synthetic import _chunk

    t0 = time.perf_counter()
    store = TraceStore(db)
    run = store.create_run("synthetic-48x128-top8", n_layers=LAYERS, moe_layers=list(range(LAYERS)), n_experts=EXPERTS, top_k=TOP_K)
    store.append(run, {"layers": {"layer": np.arange(LAYERS), "n_experts": [EXPERTS] * LAYERS, "top_k": [TOP_K] * LAYERS}})
    parts = []
    for seed in range(min(DISTINCT, -(-n_tokens // CHUNK))):
        part = A.synthetic(min(CHUNK, n_tokens), LAYERS, EXPERTS, TOP_K, seed=seed, seq_len=SEQ_LEN)
        parts.append((part, _chunk(part, part.token_text(), 0, part.n_tokens)))
    done = i = 0
    while done < n_tokens:
        part, rows = parts[i % len(parts)]
        n = min(part.n_tokens, n_tokens - done)
        shift = done // SEQ_LEN
        seqs, starts, counts = np.unique(part.seq_id[:n], return_index=True, return_counts=True)
        labels = np.array(part.label_names, dtype=object)[part.label[starts]]
        store.append(run, {"sequences": {"seq_id": seqs + shift, "label": labels, "n_tokens": counts, "prompt_len": counts}})
        tables = {name: {k: (v + shift if k == "seq_id" else v) for k, v in cols.items()} for name, cols in rows.items()}
        if n < part.n_tokens:
            tables = {name: _head(cols, n, shift) for name, cols in tables.items()}
        store.append(run, tables)
        done += n
        i += 1
    store.finish_run(run)
    return time.perf_counter() - t0


def _head(cols: dict[str, Any], n: int, shift: int) -> dict[str, Any]:
    """Rows of the first ``n`` tokens (seq_id, pos order is the tokens' order within a chunk)."""
    keep = (np.asarray(cols["seq_id"]) - shift) * SEQ_LEN + np.asarray(cols["pos"]) < n
    return {k: np.asarray(v, dtype=object if isinstance(v, np.ndarray) and v.dtype == object else None)[keep] for k, v in cols.items()}


def export_parquet(db: Path, folder: Path, n_shards: int = 8) -> None:
    """The run as the partitioned Parquet dataset (the store's own export), split into ``n_shards`` shards."""
    from moelens.store import TraceStore

    TraceStore(db, read_only=True).export_parquet(1, folder, shards=n_shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 1, 4], help="M tokens (2^20)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "analysis_scale.md")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    parser.add_argument("--smoke", action="store_true", help="only a few scores (check the script)")
    parser.add_argument("--skip", nargs="*", default=[], help="scores to leave out")
    opts = parser.parse_args()
    scores = {k: SCORES[k] for k in ("expert_load", "coactivation", "sch")} if opts.smoke else SCORES
    scores = {k: v for k, v in scores.items() if k not in opts.skip}
    load = os.getloadavg()
    lines = [
        "# Analysis at scale: chunked scores on 48 × 128 × top-8 traces",
        "",
        f"`python benchmarks/analysis_scale.py --sizes {' '.join(map(str, opts.sizes))}` · {os.cpu_count()} cores · "
        f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min; the machine is shared) · "
        "OMP_NUM_THREADS=1 · wall time excludes the interpreter's imports · each figure from a fresh subprocess (peak RSS = its VmHWM).",
        "",
    ]
    results: dict[float, dict[str, dict[str, Any]]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="moelens-scale-"))
    try:
        for size in opts.sizes:
            n = int(size * 2**20)
            db = tmp / f"run-{size}.duckdb"
            write_s = write_store(db, n)
            disk = db.stat().st_size / 2**30
            res: dict[str, dict[str, Any]] = {"_store": {"wall": write_s, "disk": disk}}
            for name, params in scores.items():
                params = {k: (1 if v == "SELF" else v) for k, v in params.items()}
                res[name] = child({"kind": "score", "db": str(db), "score": name, "params": params}, opts.timeout)
                print(size, name, res[name], flush=True)
            for label, sql in SQL.items():
                res["sql:" + label] = child({"kind": "sql", "db": str(db), "sql": sql}, opts.timeout)
                print(size, label, res["sql:" + label], flush=True)
            if size == 1 or (opts.smoke and size == opts.sizes[-1]):  # before summarize: both engines stream
                folder = tmp / f"parquet-{size}"
                export_parquet(db, folder)
                res["_parquet"] = {"disk": sum(p.stat().st_size for p in folder.rglob("*.parquet")) / 2**30}
                for name in ("expert_load", "coactivation"):
                    res["local:" + name] = child({"kind": "score", "db": str(folder), "score": name, "params": {}}, opts.timeout)
                    res["ray:" + name] = child({"kind": "score", "db": str(folder), "score": name, "params": {}, "ray": True}, opts.timeout)
                shutil.rmtree(folder)
            res["summarize"] = child({"kind": "summarize", "db": str(db)}, opts.timeout)
            for name in FROM_SUMMARIES if not opts.smoke else ("expert_load",):
                res["summary:" + name] = child({"kind": "score", "db": str(db), "score": name, "params": {}}, opts.timeout)
            db.unlink()
            results[size] = res
            lines += _size_section(size, n, res, scores)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    end = os.getloadavg()
    lines += ["", f"Load average at the end: {end[0]:.1f} / {end[1]:.1f} / {end[2]:.1f}.", ""]
    if len(results) > 1:
        lines += _scaling(results, scores)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {opts.out}")


def _cell(r: dict[str, Any]) -> tuple[str, str]:
    if "error" in r:
        return "—", r["error"]
    return f"{r['wall']:.1f}", f"{r['rss_gib']:.2f}"


def _size_section(size: float, n: int, res: dict[str, dict[str, Any]], scores: dict[str, Any]) -> list[str]:
    store = res["_store"]
    out = [
        f"## {size}M tokens ({n:,} tokens, {n * LAYERS * TOP_K / 1e6:,.0f}M routing rows)",
        "",
        f"DuckDB store: {store['disk']:.2f} GiB on disk, written in {store['wall']:.0f} s.",
        "",
        "| score | wall s | peak RSS GiB |",
        "|---|---:|---:|",
    ]
    out += [f"| {name} | {' | '.join(_cell(res[name]))} |" for name in scores]
    out += ["", "Plain DuckDB SQL for the same numbers (memory_limit 6 GB):", "", "| query | SQL wall s | SQL peak RSS GiB | chunked score | wall ratio SQL / chunked |", "|---|---:|---:|---|---:|"]
    for label, twin in SQL_TWIN.items():
        sql, ours = res["sql:" + label], res.get(twin, {"error": "not run"})
        ratio = f"{sql['wall'] / ours['wall']:.2f}" if "error" not in sql and "error" not in ours else "—"
        out.append(f"| {label} | {' | '.join(_cell(sql))} | {twin} | {ratio} |")
    out += ["", f"`summarize` (every derived summary, one pass): {' s, '.join(_cell(res['summarize']))} GiB. Then from the summaries:", "",
            "| score | wall s | peak RSS GiB |", "|---|---:|---:|"]  # fmt: skip
    out += [f"| {k[8:]} | {' | '.join(_cell(v))} |" for k, v in res.items() if k.startswith("summary:")]
    if "_parquet" in res:
        out += ["", f"Parquet dataset (8 shards, zstd): {res['_parquet']['disk']:.2f} GiB. Ray engine, 2 local workers (`ray.init(num_cpus=2)`, "
                "time after init; driver RSS only) vs the in-process engine on the same dataset:", "",
                "| score | in-process s | Ray s | ratio Ray / in-process |", "|---|---:|---:|---:|"]  # fmt: skip
        for name in ("expert_load", "coactivation"):
            a, b = res["local:" + name], res["ray:" + name]
            ratio = f"{b['wall'] / a['wall']:.2f}" if "error" not in a and "error" not in b else "—"
            out.append(f"| {name} | {_cell(a)[0]} | {_cell(b)[0]} | {ratio} |")
    return out + [""]


def _scaling(results: dict[float, dict[str, dict[str, Any]]], scores: dict[str, Any]) -> list[str]:
    sizes = sorted(results)
    out = ["## Scaling", "", f"Wall-time ratio per doubling of tokens (1.0 = linear) from {sizes[0]}M to {sizes[-1]}M; peak RSS ratio.", "",
           "| score | time exponent b (t ∝ T^b) | RSS ratio |", "|---|---:|---:|"]  # fmt: skip
    for name in scores:
        a, b = results[sizes[0]].get(name, {}), results[sizes[-1]].get(name, {})
        if "wall" in a and "wall" in b:
            exp = np.log(b["wall"] / a["wall"]) / np.log(sizes[-1] / sizes[0])
            out.append(f"| {name} | {exp:.2f} | {b['rss_gib'] / a['rss_gib']:.2f} |")
    return out + [""]


if __name__ == "__main__":
    main()
