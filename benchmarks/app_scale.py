"""Benchmark: first render of every workbench page on a big synthetic run (default 2^20 tokens, 48 layers ×
128 experts, top-8: 403M routing rows), with the derived summaries stored, via Streamlit's AppTest.

For each page one AppTest run on a tiny store warms imports and components, then ``st.cache_data`` and the analysis
run cache are cleared and a run on the big store is timed (what a visitor pays on a server that has not yet shown
this run); the sections that wait for a Compute click (a pass over more than the pass budget) are listed. The
process's peak RSS after each page is reported too (AppTest renders in this process). The summaries are what
`moelens record` stores: `moelens.analysis.summarize`, one streamed pass over each written run.

    python benchmarks/app_scale.py                        # writes benchmarks/results/app_scale.md
    python benchmarks/app_scale.py --tokens 20000 --keep /tmp/s.duckdb   # quick; keep the store for reruns
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "app"))

from moelens import TraceStore  # noqa: E402
from moelens.analysis import RoutingData  # noqa: E402
from moelens.analysis.summaries import summarize  # noqa: E402
from moelens.analysis.synthetic import synthetic, write_run  # noqa: E402

PAGES = [ROOT / "app" / "Home.py", *sorted((ROOT / "app" / "pages").glob("*.py"))]


def build(path: Path, n_tokens: int, layers: int, experts: int, k: int) -> dict[str, float]:
    t0 = time.perf_counter()
    data = synthetic(n_tokens, layers, experts, k, seq_len=512, n_labels=4, vocab_size=32768, seed=0)
    t1 = time.perf_counter()
    store = TraceStore(path)
    run = write_run(store, data, name="synthetic big run")
    t2 = time.perf_counter()
    summarize(store, run)
    t3 = time.perf_counter()
    other = _perturbed(data)
    del data
    steered = write_run(store, other, name="synthetic big run, perturbed", parent_run_id=run)
    summarize(store, steered)
    return {"generate_s": t1 - t0, "write_s": t2 - t1, "summaries_s": t3 - t2, "second_run_s": time.perf_counter() - t3}


def _perturbed(data: RoutingData) -> RoutingData:
    """The same tokens with 5 % of first choices moved to the next expert (a second run for Compare)."""
    experts = data.experts.copy()
    rng = np.random.default_rng(1)
    moved = (rng.random(experts.shape[:2]) < 0.05) & (experts[:, :, 0] >= 0)
    first = experts[:, :, 0]
    others = experts[:, :, 1:]
    candidate = (first + 1) % data.n_experts[:, None]
    clash = (others == candidate[:, :, None]).any(axis=2)
    first[moved & ~clash] = candidate[moved & ~clash]
    return RoutingData.from_arrays(experts, data.weights, n_experts=data.n_experts.tolist(), layer_ids=data.layer_ids.tolist(),
                                   top_k=data.top_k.tolist(), seq_id=data.seq_id, pos=data.pos, token_id=data.token_id,
                                   labels=[data.label_names[c] if c >= 0 else None for c in data.label],
                                   token_text=list(data.token_text()))


def render_all(db: Path, warm_db: Path, timeout: float, only: list[str], state: dict[str, str]) -> list[tuple[str, float, float, str, str]]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from moelens.analysis import clear_cache

    out = []
    for page in PAGES:
        if only and not any(o in page.stem for o in only):
            continue
        at = AppTest.from_file(str(page), default_timeout=timeout)
        at.session_state["moelens_db"] = str(warm_db)
        at.run()  # imports and components, on a tiny store
        at.session_state["moelens_db"] = str(db)
        for key, value in state.items():  # widget values, e.g. the Experts page's label filter
            at.session_state[key] = value
        st.cache_data.clear()
        clear_cache()
        if "workbench.data" in sys.modules:
            sys.modules["workbench.data"]._COMPUTED.clear()
        t0 = time.perf_counter()
        at.run()
        seconds = time.perf_counter() - t0
        problems = [str(e.value)[:120] for e in [*at.exception, *at.error]]
        waiting = [i.value.split(" needs a pass")[0].replace(":material/hourglass: ", "") for i in at.info
                   if "needs a pass over" in i.value]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out.append((page.stem, seconds, rss, ", ".join(waiting), "; ".join(problems)))
        print(f"{page.stem:20s} {seconds:7.2f} s  peak RSS {rss:5.2f} GiB  Compute: {', '.join(waiting)}  {'; '.join(problems)}",
              flush=True)
    return out


def data_budget() -> str:
    from workbench import data

    budget = data.pass_slots()
    return "no limit" if budget is None else f"{budget:,}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="store path to write (or reuse if it exists)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--pages", nargs="*", default=[], help="only pages whose file name contains one of these")
    parser.add_argument("--build-only", action="store_true", help="write the --keep store and stop")
    parser.add_argument("--state", nargs="*", default=[], metavar="KEY=VALUE",
                        help="widget values set before the timed render, e.g. exp_scope=domain1 (the Experts label filter)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "app_scale.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.keep or Path(tmp) / "big.duckdb"
        build_times = build(db, args.tokens, args.layers, args.experts, args.top_k) if not db.exists() else {}
        if args.build_only:
            print(build_times)
            return
        warm = Path(tmp) / "warm.duckdb"
        build(warm, 4096, 4, 16, 4)
        load_before = os.getloadavg()
        state = dict(item.split("=", 1) for item in args.state)
        rows = render_all(db, warm, args.timeout, args.pages, state)
        load_after = os.getloadavg()
        size = db.stat().st_size
    lines = [
        "# App: first render of every page on a big run",
        "",
        f"`python benchmarks/app_scale.py --tokens {args.tokens}` — synthetic run of {args.tokens:,} tokens × "
        f"{args.layers} layers × {args.experts} experts, top-{args.top_k} ({args.tokens * args.layers * args.top_k:,} "
        f"routing rows, DuckDB file {size / 2**30:.2f} GiB for two runs) plus a perturbed copy for Compare; summaries "
        "(`moelens.analysis.summarize`: `summary_expert_counts`, `_tokens`, `_coactivation`, `_transitions`, `_token_experts`, "
        "`_token_ids`, `_repetition`, `_committee_units`) stored for both runs. AppTest, caches cleared before each "
        "timed render (imports warm). Goal: ≤ 2 s per page.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after the renders.",
        "",
        *(f"Build: {k} {v:.1f} s" for k, v in build_times.items()),
        "",
        f"Pass budget: {data_budget()} routing slots (`MOELENS_PASS_SLOTS`); sections over it wait for Compute.",
        *([f"Widget state before the render: {', '.join(args.state)}."] if args.state else []),
        "",
        "| page | first render (s) | process peak RSS after it (GiB) | behind Compute | problems |",
        "|---|---:|---:|---|---|",
        *(f"| {name} | {sec:.2f} | {rss:.2f} | {wait or '—'} | {prob or '—'} |" for name, sec, rss, wait, prob in rows),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
