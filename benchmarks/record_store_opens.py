"""Store connections a short recording opens, and their time: `record()` of 4 short texts of a tiny Mixtral into a
new DuckDB file, then what `moelens record` does after it (build and write the run's summaries, report).

Opening a DuckDB file (and closing a writer, which checkpoints) costs tens of milliseconds, which dominates short
runs. Counts every ``duckdb.connect`` and the seconds spent in it; median of ``--reps`` runs.
Writes benchmarks/results/record_store_opens.md (``--out``). Compare two trees by running it with each on
PYTHONPATH. Run: python benchmarks/record_store_opens.py [--reps 5] [--label NAME]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import duckdb


def measure(reps: int) -> dict[str, float]:
    from moelens import TraceStore
    from moelens.cli.common import resolve_model
    from moelens.cli.record import _report
    from moelens.recording.record import record

    model, tok, _ = resolve_model("tiny:mixtral")
    real, opened, spent = duckdb.connect, [0], [0.0]

    def counting(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            opened[0] += 1
            spent[0] += time.perf_counter() - started

    rows: dict[str, list[float]] = {k: [] for k in ("record_s", "record_opens", "record_open_s", "report_s",
                                                    "report_opens", "report_open_s")}
    duckdb.connect = counting
    try:
        for _ in range(reps):
            with tempfile.TemporaryDirectory() as tmp:
                store = TraceStore(Path(tmp) / "run.duckdb")
                for phase, work in (("record", lambda: record(model, tok, ["hello world"] * 4, store=store, progress=False)),
                                    ("report", lambda: _report(store, 1, store.path))):
                    opened[0], spent[0] = 0, 0.0
                    started = time.perf_counter()
                    work()
                    rows[f"{phase}_s"].append(time.perf_counter() - started)
                    rows[f"{phase}_opens"].append(opened[0])
                    rows[f"{phase}_open_s"].append(spent[0])
    finally:
        duckdb.connect = real
    return {k: statistics.median(v) for k, v in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "record_store_opens.md")
    args = parser.parse_args()
    load = os.getloadavg()
    m = measure(args.reps)
    line = (f"| {args.label} | {m['record_opens']:.0f} | {m['record_open_s'] * 1e3:.0f} ms | {m['record_s'] * 1e3:.0f} ms "
            f"| {m['report_opens']:.0f} | {m['report_open_s'] * 1e3:.0f} ms | {m['report_s'] * 1e3:.0f} ms "
            f"| {load[0]:.1f} |\n")
    if not args.out.exists():
        args.out.write_text("# Store connections of a short recording (tiny Mixtral, 4 texts, new DuckDB file; median of "
                            f"{args.reps})\n\n| tree | record: opens | in connect | total | report: opens | in connect | total "
                            "| load (1 min, 2 cores) |\n|---|---|---|---|---|---|---|---|\n")
    with args.out.open("a") as fh:
        fh.write(line)
    print(line, end="")


if __name__ == "__main__":
    main()
