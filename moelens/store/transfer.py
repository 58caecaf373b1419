"""Moving runs between the two layouts: export a run into a Parquet dataset, import a dataset's runs into a file.

Rows stream through Arrow record batches (bounded memory whatever the run's size). Export keeps the run's id
(a dataset gathers runs from one store; the same id again is refused unless asked to overwrite); import gives
new ids, because the target file numbers its own runs. The run row is written last in both directions, so an
interrupted transfer never leaves a run that looks complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moelens.errors import StoreError
from moelens.store.schema import RUN_TABLES, SORT_KEYS, contract
from moelens.store.store import TraceStore, _ident

#: Arrow batch size for streaming rows between stores.
BATCH_ROWS = 1 << 20

#: Tokens per sorted read when exporting: each shard is written from ORDER BY queries over seq_id ranges this
#: large, so the sort stays small (cache-friendly, no spilling) whatever the run's size.
SORT_TOKENS = 1 << 15


def export_run(src: TraceStore, run_id: int, folder: str | Path, *, shards: int = 1, overwrite: bool = False) -> list[Path]:
    """Write run ``run_id`` of ``src`` into the dataset at ``folder`` as ``shards`` partitions of whole sequences."""
    from moelens.store.dataset import DatasetStore

    run_id = int(run_id)
    if shards < 1:
        raise StoreError(f"--shards must be at least 1, not {shards}")
    src.run(run_id)  # a missing id: one clear line listing the ids that exist
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"{folder} is a file; --parquet takes a folder (new, empty, or a moelens dataset) to write into")
    dst = TraceStore(folder, layout="parquet")
    assert isinstance(dst, DatasetStore)
    if dst.path.resolve() == src.path.resolve():
        raise StoreError(f"run {run_id} is already in {folder}")
    if run_id in set(dst.runs()["run_id"]):
        if not overwrite:
            old = dst.run(run_id)
            raise StoreError(
                f"{folder} already holds run {run_id} ({old['model']}, created {old['created_at']}); pass --overwrite to "
                "replace it, or export into another folder"
            )
    dst._discard(run_id)  # the replaced run, or files an interrupted export left behind
    dst._run_dir(run_id).mkdir(parents=True)
    written: list[Path | None] = []
    plan = _plan(src, run_id, shards)
    with src.connect() as con:
        for table in RUN_TABLES:
            cols = ", ".join(_ident(c) for c, _ in contract()[table] if c != "run_id")
            keys = [k for k in SORT_KEYS if k in dict(contract()[table])]
            order = f" ORDER BY {', '.join(keys)}" if keys else ""
            if table == "layers":
                written.append(dst._write_part(table, run_id, None, _batches(con, f"SELECT {cols} FROM {table} WHERE run_id = ?{order}", [run_id])))
                continue
            sql = f"SELECT {cols} FROM {table} WHERE run_id = ? AND seq_id >= ? AND seq_id < ?{order}"
            for shard, ranges in enumerate(plan):
                batches = (b for lo, hi in ranges for b in _batches(con, sql, [run_id, lo, hi]))
                written.append(dst._write_part(table, run_id, shard, batches))
        marked = dst._shards_on_disk(run_id)
        for shard in marked:
            dst._mark_shard(run_id, shard)
        row = con.sql("SELECT * EXCLUDE (run_id, n_shards), CAST(? AS INTEGER) AS n_shards FROM runs WHERE run_id = ?",
                      params=[len(marked), run_id]).to_arrow_table()  # a reader can tell a shard missing later
    for name in sorted(src.summary_names(run_id)):
        written.append(dst._summary_file(run_id, name, src.read_summary(run_id, name)))
    written.append(dst._write_run_row(run_id, row))  # last: the run exists in the dataset once everything else landed
    return [p for p in written if p is not None]


def import_runs(folder: str | Path, dst: TraceStore, runs: list[int] | None = None) -> dict[int, int]:
    """Load runs of the dataset at ``folder`` (every run, or ``runs``) into ``dst`` as new runs; {old id: new id}."""
    from moelens.store.dataset import DatasetStore

    folder = Path(folder)
    if folder.is_file():
        raise StoreError(f"{folder} is a file; moelens import takes a dataset folder written by moelens export")
    src = TraceStore(folder, read_only=True, layout="parquet")
    assert isinstance(src, DatasetStore)
    if isinstance(dst, DatasetStore):
        raise StoreError("import loads a dataset into a DuckDB file; give --db a .duckdb path")
    available = [int(r) for r in src.runs()["run_id"]]
    wanted = available if not runs else [int(r) for r in runs]
    for r in wanted:
        src.run(r)  # a missing id: one clear line listing the ids the dataset has
    mapping: dict[int, int] = {}
    with src.connect() as scon:
        for old in wanted:
            mapping[old] = _copy_into_file(scon, old, dst, mapping)
    for old, new in mapping.items():
        for name in sorted(src.summary_names(old)):
            dst.write_summary(new, name, src.read_summary(old, name))
    return mapping


def _copy_into_file(scon: Any, old: int, dst: TraceStore, mapping: dict[int, int]) -> int:
    """One run's rows into the DuckDB file ``dst`` in one transaction; the parent id follows the mapping."""
    row = scon.sql("SELECT * FROM runs WHERE run_id = ?", params=[old]).to_arrow_table().to_pylist()[0]
    parent = row.get("parent_run_id")
    with dst.connect(write=True) as con:
        con.execute("BEGIN TRANSACTION")
        try:
            new = int(con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchall()[0][0])
            row.update(run_id=new, parent_run_id=mapping.get(parent) if parent is not None else None,
                       n_shards=None)  # a DuckDB file holds a run in one piece
            con.register("_moelens_run", pa.Table.from_pylist([row], schema=scon.sql("SELECT * FROM runs LIMIT 0").to_arrow_table().schema))
            con.execute("INSERT INTO runs BY NAME SELECT * FROM _moelens_run")
            con.unregister("_moelens_run")
            for table in RUN_TABLES:
                cols = ", ".join(_ident(c) for c, _ in contract()[table] if c != "run_id")
                reader = scon.sql(f"SELECT {cols} FROM {table} WHERE run_id = ?", params=[old]).to_arrow_reader(BATCH_ROWS)
                con.register("_moelens_rows", reader)
                con.execute(f"INSERT INTO {table} (run_id, {cols}) SELECT ?, {cols} FROM _moelens_rows", [new])
                con.unregister("_moelens_rows")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return new


def _batches(con: Any, sql: str, params: list[Any]):
    reader = con.sql(sql, params=params).to_arrow_reader(BATCH_ROWS)
    yield from reader


def _plan(src: TraceStore, run_id: int, shards: int) -> list[list[tuple[int, int]]]:
    """Per shard, the half-open seq_id ranges ``[lo, hi)`` to read it in (~SORT_TOKENS tokens each). Shards hold
    whole sequences and about equal token counts; together the ranges cover every INTEGER seq_id."""
    lo, hi = -(2**31), 2**31
    counts = src.arrow("SELECT seq_id, count(*) AS n FROM tokens WHERE run_id = ? GROUP BY seq_id ORDER BY seq_id", [run_id])
    if counts.num_rows == 0:
        counts = src.arrow("SELECT seq_id, count(*) AS n FROM routing WHERE run_id = ? GROUP BY seq_id ORDER BY seq_id", [run_id])
    ids = counts.column("seq_id").to_numpy()
    n = counts.column("n").to_numpy().astype(np.float64)
    before = np.cumsum(n) - n  # tokens before each sequence
    shard_of = np.minimum((before * shards // max(n.sum(), 1)).astype(np.int64), shards - 1)
    piece = (before // SORT_TOKENS).astype(np.int64)
    plan: list[list[tuple[int, int]]] = []
    for s in np.unique(shard_of):
        here = np.flatnonzero(shard_of == s)
        starts = [int(ids[i]) for i in here[np.r_[True, np.diff(piece[here]) > 0]]]
        plan.append(list(zip(starts, [*starts[1:], None])))
    if not plan:
        return [[(lo, hi)]]
    for i in range(len(plan) - 1):  # a shard's last range ends where the next shard starts
        plan[i][-1] = (plan[i][-1][0], plan[i + 1][0][0])
    plan[0][0] = (lo, plan[0][0][1])
    plan[-1][-1] = (plan[-1][-1][0], hi)
    return [[(a, b if b is not None else hi) for a, b in ranges] for ranges in plan]
