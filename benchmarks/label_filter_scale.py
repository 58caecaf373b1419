"""The app's label filter on a big run: a score over one label's sequences, streamed with ``only_label`` (the
label's sequences alone, in batches), against the route it replaced (the whole run loaded into one
`RoutingData`, then the label's tokens selected). Each figure from a fresh subprocess (peak RSS = its VmHWM),
one numpy thread; the store is a synthetic 48 × 128 × top-8 run without derived summaries (as
`analysis_scale.py` writes; the label filter never reads summaries, which hold the whole run).

    python benchmarks/label_filter_scale.py --db /path/to/1m.duckdb --label domain1
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from analysis_scale import child

ROOT = Path(__file__).resolve().parents[1]
#: The scores the Experts page filters by label (shared_expert_stats: a synthetic run has no shared experts).
SCORES = {"layer_balance": {}, "coactivation": {}, "expert_top_tokens": {"layer": 20, "expert": 5, "n": 20, "n_contexts": 3}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, required=True, help="a DuckDB store whose run 1 is labelled")
    ap.add_argument("--label", default="domain1")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "label_filter_scale.md")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = []
    for score, params in SCORES.items():
        for route, kind in (("streamed (only_label)", "score"), ("whole run loaded, then selected", "loaded")):
            r = child({"kind": kind, "db": str(args.db), "score": score, "params": {**params, "only_label": args.label}}, args.timeout)
            rows.append((score, route, r))
            print(score, route, r, flush=True)
    lines = [
        "# Label filter on a big run", "",
        f"Store `{args.db.name}`: run 1, {args.db.stat().st_size / 2**30:.2f} GiB on disk, no derived summaries; label "
        f"`{args.label}`. One invocation ({time.strftime('%Y-%m-%d %H:%M')}), load {load:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end; 2 cores, OMP_NUM_THREADS=1; each figure from a fresh subprocess.", "",
        "| score | route | wall s | peak RSS GiB |", "|---|---|---|---|",
    ]
    for score, route, r in rows:
        cells = ("error: " + r["error"], "") if "error" in r else (f"{r['wall']:.1f}", f"{r['rss_gib']:.2f}")
        lines.append(f"| {score} | {route} | {cells[0]} | {cells[1]} |")
    ratios = []
    for score in SCORES:
        new, old = (r for s, _, r in rows if s == score)
        if "error" not in new and "error" not in old:
            ratios.append(f"- {score}: {old['wall'] / new['wall']:.2f}× faster, {old['rss_gib'] / new['rss_gib']:.2f}× less memory streamed")
    args.out.write_text("\n".join(lines + ["", "Ratios (loaded / streamed):", "", *ratios, ""]))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
