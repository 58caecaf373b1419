"""The scale-out layout: the trace store's tables as a partitioned Parquet dataset that DuckDB queries in place.

::

    DIR/moelens_dataset.json                          format marker and schema version
    DIR/runs/run_id=R/run.parquet                     the run's row (replaced atomically by update/finish)
    DIR/runs/run_id=R/shard=S.done                    shard S's completion marker (JSON: rows per table)
    DIR/layers/run_id=R/part-N.parquet                the run's routed components
    DIR/<table>/run_id=R/shard=S/part-N.parquet       row tables (sequences, tokens, routing, ...)
    DIR/summary_<name>/run_id=R/part-0.parquet        derived summaries

Why this shape: Hive partitions let DuckDB skip every file of other runs from the path alone (``WHERE run_id = ?``
opens no other run's file); inside a shard rows are sorted by ``(seq_id, pos, layer, rank)`` in row groups of
about a million rows, so a seq_id-range filter skips row groups by their statistics. Files hold neither ``run_id``
nor ``shard`` (the path does). A sequence never spans shards, so a shard is a unit of work for a distributed score.

Many writers, no locks: each worker writes its own shard (`append(..., shard=S)`, then `finish_shard`); every
file is written under a temporary name no reader globs (``*.parquet.tmp``) and renamed into place, so a reader
sees whole files only. A run becomes ``complete`` only in `finish_run`, which refuses while any shard that has
rows lacks its marker: a dead worker leaves a run that stays ``recording``, never one that looks complete.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moelens.errors import StoreCorruptError, StoreError, StoreNotFoundError, StoreVersionError
from moelens.store.schema import DDL, RUN_TABLES, SCHEMA_VERSION, SORT_KEYS, SUMMARY_PREFIX, contract, summary_table
from moelens.store.store import (
    _FINISH_SQL,
    DATASET_MARKER,
    LOCK_TIMEOUT_S,
    TraceStore,
    _check_status,
    _ident,
    _insert_run,
    _prepare,
    _run_values,
    _summary_target,
    _update_sql,
    _version,
)

FORMAT = "moelens-parquet-dataset"

#: Tables with one small file per run (no shards).
PER_RUN = ("runs", "layers")

#: Rows per Parquet row group: ~2.7k tokens of a 48-layer top-8 model, fine-grained enough for seq_id pruning.
ROW_GROUP_ROWS = 1 << 20

_HIVE_RUN = "hive_partitioning = true, union_by_name = true, hive_types = {'run_id': INTEGER}"
_HIVE = "hive_partitioning = true, union_by_name = true, hive_types = {'run_id': INTEGER, 'shard': INTEGER}"


def _hive(files: list[str]) -> str:
    """read_parquet options for files under ``run_id=R/`` (and ``shard=S/`` for the row tables)."""
    return _HIVE if Path(files[0]).parent.name.startswith("shard=") else _HIVE_RUN
_RUN_DIR = re.compile(r"run_id=(\d+)$")
_SHARD = re.compile(r"shard=(\d+)(?:\.done)?$")

#: Parquet footers already described, by file list: columns present (the union over the files).
_described: dict[tuple[str, ...], frozenset[str]] = {}
_described_lock = threading.Lock()


class DatasetStore(TraceStore):
    """`TraceStore` over a Parquet dataset folder: the same tables, queries and run lifecycle.

    Reads go through an in-memory DuckDB connection with one view per table over ``read_parquet`` (so
    ``store.query``/``arrow``/``connect`` see the usual table names); writes are Parquet files. Created with
    ``TraceStore(DIR, layout="parquet")``; an existing dataset is recognised by its ``moelens_dataset.json``.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False, lock_timeout: float = LOCK_TIMEOUT_S,
                 layout: str | None = None):
        self.path = Path(path)
        self.read_only = read_only
        self.lock_timeout = lock_timeout
        self._session: duckdb.DuckDBPyConnection | None = None
        self._shims = ()
        self._open_shards: set[tuple[int, int]] = set()  # shards this object wrote and finish_run may close
        self.shard: int | None = None  # set by `only_shard`: the sharded tables' views read that shard alone
        marker = self.path / DATASET_MARKER
        if not marker.is_file():
            self._create_folder()
        try:
            info = json.loads(marker.read_text())
            version = int(info["schema_version"])
            assert info.get("format") == FORMAT
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise StoreCorruptError(f"{marker} is not a moelens dataset marker ({exc}); the folder was left untouched") from exc
        if version > SCHEMA_VERSION:
            raise StoreVersionError(
                f"{self.path} is a dataset of schema version {version}, newer than this moelens understands "
                f"({SCHEMA_VERSION}). Upgrade moelens to read it; the folder was left untouched."
            )
        self.schema_version = version

    def __repr__(self) -> str:
        return f"TraceStore({str(self.path)!r}{', read_only=True' if self.read_only else ''})  # Parquet dataset"

    def _create_folder(self) -> None:
        if self.read_only:
            raise StoreNotFoundError(f"No moelens dataset at {self.path} (no {DATASET_MARKER}); write one with moelens export")
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file; a Parquet dataset is a folder. Give a folder path (new or empty).")
        if self.path.is_dir() and any(self.path.iterdir()):
            raise StoreError(
                f"{self.path} is a folder with other files in it and not a moelens dataset (no {DATASET_MARKER}); "
                "give a new or empty folder so nothing of yours is mixed in or overwritten."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        info = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "created_by": f"moelens {_version()}"}
        _atomic_bytes(self.path / DATASET_MARKER, json.dumps(info, indent=2).encode())

    # -- reading -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def connect(self, *, write: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB connection with a view per table over this dataset's files (read-only)."""
        if write:
            raise StoreError(f"{self.path} is a Parquet dataset: it is written through create_run/append/finish_run, "
                             "not SQL. Import it into a DuckDB file (moelens import) to change it with SQL.")
        if self._session is not None:
            yield self._session
            return
        con = duckdb.connect()
        try:
            self._define_views(con)
            yield con
        finally:
            con.close()

    def _define_views(self, con: duckdb.DuckDBPyConnection) -> None:
        con.register("meta", pa.table({"key": ["schema_version", "format"], "value": [str(self.schema_version), FORMAT]}))
        files = {t: self._files(t) for t in contract() if t not in ("meta", "summaries", "runs")}
        for table, table_files in files.items():
            con.execute(f"CREATE VIEW {_ident(table)} AS {_select(table, table_files)}")
        self._define_runs_view(con, files if self.shard is None else {t: self._every_shard(t) for t in files})
        registry = []
        for target in sorted(p.name for p in self.path.glob(SUMMARY_PREFIX + "*") if p.is_dir()):
            files = sorted(glob.glob(str(self.path / glob.escape(target) / "run_id=*" / "part-0.parquet")))
            for f in files:
                meta = pq.read_metadata(f)
                registry.append((int(_RUN_DIR.search(Path(f).parent.name).group(1)), target[len(SUMMARY_PREFIX):],
                                 meta.num_rows, meta.schema.names))
            if files:
                con.execute(f"CREATE VIEW {_ident(target)} AS SELECT CAST(run_id AS INTEGER) AS run_id, * EXCLUDE (run_id) "
                            f"FROM read_parquet({_list(files)}, {_HIVE_RUN})")
        con.register("summaries", pa.table({
            "run_id": pa.array([r[0] for r in registry], pa.int32()), "name": pa.array([r[1] for r in registry], pa.string()),
            "n_rows": pa.array([r[2] for r in registry], pa.int64()),
            "columns": pa.array([r[3] for r in registry], pa.list_(pa.string())),
        }))

    def _define_runs_view(self, con: duckdb.DuckDBPyConnection, files: dict[str, list[str]]) -> None:
        """``runs`` as stored, except that a run stored ``complete`` whose shards are not all whole on disk reads
        ``incomplete``, its ``error`` saying which shard is missing or partial (`_shard_problem`): a shard folder
        deleted or copied partially after the run finished is never analysed as if the run were complete.
        ``files``: every table's files, all shards (one glob per table, already made for the views)."""
        run_files = self._files("runs")
        con.execute(f"CREATE VIEW _stored_runs AS {_select('runs', run_files)}")
        stored = {int(_RUN_DIR.search(Path(f).parent.name).group(1)): n_shards
                  for f in run_files for status, n_shards in [_run_state(f)] if status == "complete"}
        problems: list[tuple[int, str]] = []
        if stored:
            rows: dict[tuple[int, int], dict[str, int]] = {}  # (run, shard) -> rows per table, complete runs only
            for table, table_files in files.items():
                for f in table_files:
                    shard_dir = Path(f).parent
                    run = _RUN_DIR.search(shard_dir.parent.name)
                    if table not in PER_RUN and run and int(run.group(1)) in stored:
                        cell = rows.setdefault((int(run.group(1)), int(_SHARD.match(shard_dir.name).group(1))), {})
                        cell[table] = cell.get(table, 0) + _row_count([f])
            problems = [(run_id, problem) for run_id, n_shards in stored.items()
                        if (problem := self._shard_problem(run_id, n_shards, rows)) is not None]
        con.register("_run_problems", pa.table({"run_id": pa.array([p[0] for p in problems], pa.int32()),
                                                "problem": pa.array([p[1] for p in problems], pa.string())}))
        con.execute("CREATE VIEW runs AS SELECT r.* REPLACE (CASE WHEN p.problem IS NULL THEN r.status ELSE 'incomplete' END "
                    "AS status, coalesce(p.problem, r.error) AS error) FROM _stored_runs r LEFT JOIN _run_problems p USING (run_id)")

    def _shard_problem(self, run_id: int, n_shards: int | None, rows: dict[tuple[int, int], dict[str, int]]) -> str | None:
        """Why the run's rows on disk are not the whole run (None when they are): one of its ``n_shards`` shards
        (or, when unknown, of the shards on disk) lacks its completion marker, holds other row counts than the
        marker wrote down, or a shard that is not the run's has rows. ``rows``: rows per table of each shard."""
        marked = {int(m.group(1)) for p in self._run_dir(run_id).glob("shard=*.done") if (m := _SHARD.match(p.name))}
        on_disk = sorted(marked | {shard for run, shard in rows if run == run_id})
        expected = list(range(int(n_shards))) if n_shards is not None and not pd.isna(n_shards) else on_disk
        fix = "re-record it, or copy the run's folders again whole"
        missing = [s for s in expected if s not in marked]
        if missing:
            return (f"run {run_id}: shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of "
                    f"{len(expected)} {'have' if len(missing) > 1 else 'has'} no completion marker (deleted or copied "
                    f"partially after the run finished); its rows are incomplete: {fix}")
        stray = sorted(set(on_disk) - set(expected))
        if stray:
            return f"run {run_id}: shard {stray[0]} is not one of its {len(expected)} shards; its rows would be counted twice: {fix}"
        for shard in expected:
            try:
                promised = json.loads(self._marker(run_id, shard).read_text())["rows"]
            except (OSError, ValueError, KeyError, TypeError):
                return f"run {run_id}: the completion marker of shard {shard} cannot be read: {fix}"
            have = rows.get((int(run_id), shard), {})
            for table in (t for t in RUN_TABLES if t not in PER_RUN):
                if have.get(table, 0) != promised.get(table, 0):
                    return (f"run {run_id}: shard {shard} has {have.get(table, 0):,} {table} rows where it finished with "
                            f"{promised.get(table, 0):,} (files deleted or copied partially); {fix}")
        return None

    def _every_shard(self, table: str) -> list[str]:
        """The table's files of every run and shard, also in an `only_shard` view."""
        pattern = ["run_id=*", "*.parquet"] if table in PER_RUN else ["run_id=*", "shard=*", "*.parquet"]
        return sorted(glob.glob(os.path.join(glob.escape(str(self.path / table)), *pattern)))

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Nothing to share: a dataset's writes are files, not connections."""
        yield

    def only_shard(self, shard: int) -> DatasetStore:
        """A read-only view of this dataset in which the sharded tables (sequences, tokens, routing, ...) hold
        one shard's rows only: what a distributed worker reads, with the same queries as the whole store."""
        view = DatasetStore(self.path, read_only=True, lock_timeout=self.lock_timeout)
        view.shard = int(shard)
        return view

    def _files(self, table: str, run_id: int | None = None, shard: int | None = None) -> list[str]:
        """The table's Parquet files (sorted: parts in write order), optionally of one run / shard."""
        shard = self.shard if shard is None else shard
        run = "run_id=*" if run_id is None else f"run_id={int(run_id)}"
        if table == "runs":
            pattern = [run, "run.parquet"]
        elif table in PER_RUN:
            pattern = [run, "*.parquet"]
        else:
            pattern = [run, "shard=*" if shard is None else f"shard={int(shard)}", "*.parquet"]
        return sorted(glob.glob(os.path.join(glob.escape(str(self.path / table)), *pattern)))

    def shard_ids(self, run_id: int) -> list[int]:
        """The shards of a run (each holds whole sequences; a distributed score maps over them)."""
        self.run(run_id)
        return self._shards_on_disk(run_id)

    def _shards_on_disk(self, run_id: int) -> list[int]:
        """Shards with a marker or a folder of rows in any table."""
        folders = [self._run_dir(run_id), *(self.path / t / f"run_id={int(run_id)}" for t in RUN_TABLES if t not in PER_RUN)]
        return sorted({int(m.group(1)) for f in folders if f.is_dir() for p in f.iterdir() if (m := _SHARD.match(p.name))})

    def shard_files(self, table: str, run_id: int, shard: int) -> list[Path]:
        """The Parquet files of one shard of one table (for a worker that reads its shard directly)."""
        if table in PER_RUN or table not in contract():
            raise ValueError(f"{table!r} is not a sharded table; sharded tables: {[t for t in RUN_TABLES if t not in PER_RUN]}")
        return [Path(f) for f in self._files(table, run_id, shard)]

    def shard_done(self, run_id: int, shard: int) -> bool:
        """Whether shard ``shard`` of the run has its completion marker."""
        return self._marker(run_id, shard).is_file()

    def _data_state(self, run_id: int) -> tuple:
        out = []
        for table in RUN_TABLES:
            for f in self._files(table, run_id):
                st = os.stat(f)
                out.append((f, st.st_size, st.st_mtime_ns))
        return tuple(out)

    # -- writing -------------------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.path} was opened read-only; open it with read_only=False to change it")

    def _run_dir(self, run_id: int) -> Path:
        return self.path / "runs" / f"run_id={int(run_id)}"

    def _marker(self, run_id: int, shard: int) -> Path:
        return self._run_dir(run_id) / f"shard={int(shard)}.done"

    def _require_run(self, run_id: int) -> None:
        if not (self._run_dir(run_id) / "run.parquet").is_file():
            self.run(run_id)  # raises RunNotFoundError with the ids that exist

    def create_run(self, model: str, **fields: Any) -> int:
        """Register a new run in state ``recording`` and return its id (safe with concurrent creators)."""
        self._writable()
        values = _run_values({"model": model, **fields})
        (self.path / "runs").mkdir(exist_ok=True)
        run_id = self._next_run_id()
        while True:
            try:
                self._run_dir(run_id).mkdir()  # atomic: claims the id against another process
                break
            except FileExistsError:
                run_id += 1
        self._stage_run(run_id, lambda con: _insert_run(con, run_id, values), fresh=True)
        return run_id

    def _next_run_id(self) -> int:
        ids = [int(m.group(1)) for p in self.path.glob("*/run_id=*") if (m := _RUN_DIR.search(p.name))]
        return max(ids, default=0) + 1

    def _stage_run(self, run_id: int, change: Any, *, fresh: bool = False) -> None:
        """Apply ``change(con)`` to the run's row in an in-memory ``runs`` table (the same SQL as the DuckDB file)
        and write the row back atomically."""
        path = self._run_dir(run_id) / "run.parquet"
        con = duckdb.connect()
        try:
            con.execute(next(d for d in DDL if "EXISTS runs " in d))
            if not fresh:
                con.execute(f"INSERT INTO runs SELECT * FROM ({_select('runs', [str(path)])})")
            change(con)
            self._write_run_row(run_id, con.sql("SELECT * EXCLUDE (run_id) FROM runs").to_arrow_table())
        finally:
            con.close()

    def finish_run(self, run_id: int, status: str = "complete", error: str | None = None) -> None:
        """Mark a run ``complete`` or ``failed``. ``complete`` needs every shard that has rows to be finished
        (this object's own shards are finished here), each of the run's ``n_shards`` (when set) to be finished,
        and no sequence split over two shards."""
        self._writable()
        _check_status(status)
        self._require_run(run_id)
        if status == "complete":
            n_shards = self.run(run_id)["n_shards"]
            missing = [] if pd.isna(n_shards) else [s for s in range(int(n_shards)) if not self.shard_done(run_id, s)
                                                     and (int(run_id), s) not in self._open_shards]
            if missing:
                raise StoreError(f"run {run_id}: shard {missing[0]} of its {int(n_shards)} shards has not finished (no "
                                 "completion marker); the run stays 'recording'. Finish that shard, or mark the run failed.")
            for shard in self.shard_ids(run_id):
                if not self.shard_done(run_id, shard):
                    if (int(run_id), shard) not in self._open_shards:
                        raise StoreError(
                            f"run {run_id}: shard {shard} has rows but no completion marker (its writer has not called "
                            "finish_shard, or died); the run stays 'recording'. Finish that shard, or mark the run failed."
                        )
                    self.finish_shard(run_id, shard)
            self._check_sequences_in_one_shard(run_id)
        self._stage_run(run_id, lambda con: con.execute(_FINISH_SQL, [status, error, int(run_id)]))

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set run fields known only after recording starts (one writer: the driver)."""
        self._writable()
        values = _run_values(fields)
        if values:
            self._require_run(run_id)
            self._stage_run(run_id, lambda con: con.execute(_update_sql(values), [*values.values(), int(run_id)]))

    def append(self, run_id: int, tables: Mapping[str, pa.Table | pa.RecordBatch | Mapping[str, Any]], *, shard: int = 0) -> None:
        """Write rows as one new Parquet part per table into ``shard`` of the run (``layers`` goes to the run's
        folder). Every table is converted before any file is written; one writer per shard."""
        self._writable()
        if int(shard) < 0:
            raise ValueError(f"shard must be >= 0, not {shard}")
        self._require_run(run_id)
        if self.shard_done(run_id, shard):
            raise StoreError(f"run {run_id}: shard {shard} is already finished; write new rows into another shard")
        prepared = _prepare(run_id, tables)
        for name, table in prepared:
            table = table.drop_columns(["run_id"])
            keys = [k for k in SORT_KEYS if k in table.column_names]
            if keys:
                table = table.sort_by([(k, "ascending") for k in keys])
            self._write_part(name, run_id, None if name in PER_RUN else shard, [table])
        if prepared:
            self._open_shards.add((int(run_id), int(shard)))

    def finish_shard(self, run_id: int, shard: int) -> None:
        """Mark shard ``shard`` of the run complete (its writer's last call); it takes no more rows."""
        self._writable()
        self._require_run(run_id)
        self._mark_shard(run_id, shard)

    def _mark_shard(self, run_id: int, shard: int) -> None:
        rows = {t: sum(pq.read_metadata(f).num_rows for f in self._files(t, run_id, shard))
                for t in RUN_TABLES if t not in PER_RUN}
        body = {"rows": {t: n for t, n in rows.items() if n}, "moelens": _version()}
        _atomic_bytes(self._marker(run_id, shard), json.dumps(body, indent=2).encode())
        self._open_shards.discard((int(run_id), int(shard)))

    def _write_part(self, table: str, run_id: int, shard: int | None, batches: Iterable[pa.Table | pa.RecordBatch]) -> Path | None:
        """Stream ``batches`` into one new part file of the table (None if there were no rows)."""
        folder = self.path / table / f"run_id={int(run_id)}"
        if shard is not None:
            folder = folder / f"shard={int(shard)}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{uuid.uuid4().hex}.parquet.tmp"
        writer, pending, n_pending = None, [], 0

        def flush(final: bool = False) -> None:
            """Write whole row groups of ROW_GROUP_ROWS (and, at the end, the rest)."""
            nonlocal writer, pending, n_pending
            if not pending:
                return
            rows = pa.concat_tables([p if isinstance(p, pa.Table) else pa.Table.from_batches([p]) for p in pending])
            cut = rows.num_rows if final else rows.num_rows // ROW_GROUP_ROWS * ROW_GROUP_ROWS
            if writer is None:
                writer = pq.ParquetWriter(tmp, rows.schema, compression="zstd")
            writer.write_table(rows.slice(0, cut), row_group_size=ROW_GROUP_ROWS)
            pending = [rows.slice(cut)] if cut < rows.num_rows else []
            n_pending = rows.num_rows - cut

        try:
            for batch in batches:  # gathered into row groups of ~ROW_GROUP_ROWS (readers' batches are smaller)
                if batch.num_rows:
                    pending.append(batch)
                    n_pending += batch.num_rows
                    if n_pending >= ROW_GROUP_ROWS:
                        flush()
            flush(final=True)
            if writer is None:
                return None
            writer.close()
            writer = None
            return _publish(tmp, folder)
        finally:
            if writer is not None:
                writer.close()
            tmp.unlink(missing_ok=True)

    def _check_sequences_in_one_shard(self, run_id: int) -> None:
        files = self._files("tokens", run_id) or self._files("routing", run_id)
        if len({Path(f).parent for f in files}) < 2:
            return
        with contextlib.closing(duckdb.connect()) as con:
            split = con.execute(f"SELECT seq_id FROM read_parquet({_list(files)}, {_HIVE}) GROUP BY seq_id "
                                "HAVING count(DISTINCT shard) > 1 ORDER BY seq_id LIMIT 5").fetchall()
        if split:
            raise StoreError(f"run {run_id}: sequences {[r[0] for r in split]} have rows in more than one shard; a "
                             "sequence must stay in one shard (scores need its whole context). The run stays 'recording'.")

    def delete_run(self, run_id: int) -> None:
        """Delete a run, its rows and its summaries. The run row goes first, so a crash leaves orphan files of a
        run nobody lists (removed by the next export or delete of that id), never a complete-looking partial run."""
        self._writable()
        self.run(run_id)
        self._discard(run_id)

    def _discard(self, run_id: int) -> None:
        trash = self.path / ".trash" / uuid.uuid4().hex
        trash.mkdir(parents=True)
        tables = ["runs", *(p.name for p in self.path.iterdir() if p.is_dir() and p.name not in (".trash", "runs"))]
        for i, table in enumerate(tables):
            folder = self.path / table / f"run_id={int(run_id)}"
            if folder.exists():
                folder.rename(trash / f"{i}")
        shutil.rmtree(trash, ignore_errors=True)

    # -- derived summaries ---------------------------------------------------------------------------

    def write_summary(self, run_id: int, name: str, table: pa.Table) -> None:
        """Store ``table`` as the run's ``summary_<name>`` (one file, replaced atomically)."""
        self._writable()
        _summary_target(name, table)
        self._require_run(run_id)
        self._summary_file(run_id, name, table)

    def _summary_file(self, run_id: int, name: str, table: pa.Table) -> Path:
        path = self.path / summary_table(name) / f"run_id={int(run_id)}" / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_parquet(path, table)
        return path

    def _write_run_row(self, run_id: int, row: pa.Table) -> Path:
        self._run_dir(run_id).mkdir(parents=True, exist_ok=True)
        _write_parquet(self._run_dir(run_id) / "run.parquet", row)
        return self._run_dir(run_id) / "run.parquet"

    def read_summary(self, run_id: int, name: str) -> pa.Table | None:
        path = self.path / summary_table(name) / f"run_id={int(run_id)}" / "part-0.parquet"
        return pq.ParquetFile(path).read() if path.is_file() else None

    def summary_names(self, run_id: int) -> set[str]:
        found = glob.glob(str(self.path / f"{SUMMARY_PREFIX}*" / f"run_id={int(run_id)}" / "part-0.parquet"))
        return {Path(f).parent.parent.name[len(SUMMARY_PREFIX):] for f in found}


#: Row counts of Parquet files, and status and shard count of run rows, already read, by ``(path, size, mtime)``:
#: checking a run's shards against their markers then costs a stat per file, not a read, on every connection.
_row_counts: dict[tuple[str, int, int], int] = {}


_run_states: dict[tuple[str, int, int], tuple[str, int | None]] = {}


def _cached(cache: dict, path: str, read: Any) -> Any:
    """``read(path)``, remembered until the file changes (its size or mtime)."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in cache:
        if len(cache) > 65_536:
            cache.clear()
        cache[key] = read(path)
    return cache[key]


def _row_count(files: list[str]) -> int:
    return sum(_cached(_row_counts, f, lambda p: pq.read_metadata(p).num_rows) for f in files)


def _run_state(path: str) -> tuple[str, int | None]:
    """``(status, n_shards)`` of a run row file (``n_shards`` None in a file written before it existed)."""
    def read(p: str) -> tuple[str, int | None]:
        row = pq.ParquetFile(p).read().to_pylist()[0]
        return row["status"], row.get("n_shards")

    return _cached(_run_states, path, read)


def _select(table: str, files: list[str]) -> str:
    """SELECT of the table's contract columns over ``files``, typed as in the DuckDB file; a column absent from
    every file (written by an older moelens) is NULL, and no files at all is an empty table."""
    have = _columns(files) if files else frozenset()
    cols = ", ".join((f"CAST({_ident(c)} AS {t})" if c in have else f"CAST(NULL AS {t})") + f" AS {_ident(c)}"
                     for c, t in contract()[table])
    return f"SELECT {cols} FROM read_parquet({_list(files)}, {_hive(files)})" if files else f"SELECT {cols} WHERE false"


def _columns(files: list[str]) -> frozenset[str]:
    """Columns present in any of ``files`` (footers read once per file list, then cached)."""
    key = tuple(files)
    with _described_lock:
        if key in _described:
            return _described[key]
    with contextlib.closing(duckdb.connect()) as con:
        try:
            cols = frozenset(r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({_list(files)}, {_hive(files)})").fetchall())
        except duckdb.Error as exc:
            raise StoreCorruptError(f"a Parquet file of the dataset cannot be read: {exc}") from exc
    with _described_lock:
        if len(_described) > 4096:
            _described.clear()
        _described[key] = cols
    return cols


def _list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def _write_parquet(path: Path, table: pa.Table) -> None:
    """Write one whole file under a temporary name, then rename it over ``path`` (readers see old or new)."""
    tmp = path.with_name(f".{uuid.uuid4().hex}.parquet.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, folder: Path) -> Path:
    """Give a finished part its final name ``part-NNNNN.parquet`` without ever replacing another part."""
    n = len(glob.glob(str(folder / "part-*.parquet")))
    while True:
        final = folder / f"part-{n:05d}.parquet"
        try:
            os.link(tmp, final)  # fails if the name is taken: a second writer never clobbers a part
            return final
        except FileExistsError:
            n += 1
        except OSError:  # a file system without hard links: check, then rename
            if final.exists():
                n += 1
                continue
            os.replace(tmp, final)
            return final

