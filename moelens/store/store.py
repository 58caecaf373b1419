"""`TraceStore`: one DuckDB file holding many routing runs (or, through the same class, a Parquet dataset).

Connections are short-lived on purpose. DuckDB lets one process write *or* many processes read a file;
by opening a connection only for the duration of one append or one query, a recorder and the app can
share a store: each waits briefly (with retries) for the other's lock instead of failing.

``TraceStore(path)`` opens either layout: a folder holding ``moelens_dataset.json`` is the partitioned
Parquet dataset (`moelens.store.dataset.DatasetStore`, same tables and methods), anything else a DuckDB file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from moelens.errors import (
    RunNotFoundError,
    StoreCorruptError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    StoreVersionError,
)
from moelens.store.schema import (
    ARROW_SCHEMAS,
    DDL,
    MIGRATIONS,
    RUN_FIELDS,
    RUN_TABLES,
    SCHEMA_VERSION,
    contract,
    summary_table,
)

DEFAULT_DB = Path("traces") / "moelens.duckdb"

#: DuckDB's row-group size; appends are cut into Arrow batches of this many rows.
ROW_GROUP = 122_880

#: How long to keep retrying when another process holds the file lock.
LOCK_TIMEOUT_S = 30.0

#: The file that makes a folder a moelens Parquet dataset (format and schema version).
DATASET_MARKER = "moelens_dataset.json"

LAYOUTS = ("duckdb", "parquet")

_FINISH_SQL = "UPDATE runs SET status = ?, error = ?, finished_at = current_timestamp WHERE run_id = ?"


def _version() -> str:
    from moelens import __version__

    return __version__


class TraceStore:
    """A moelens trace store (DuckDB file, or a Parquet dataset folder).

    ``TraceStore(path)`` creates the file if needed; ``TraceStore(path, read_only=True)`` never writes and
    refuses a missing file. Every method opens its own connection, so the object is cheap and safe to keep.
    ``layout="parquet"`` creates a new dataset folder; an existing one is recognised by its marker file.

    Opening an older (schema v1) file for writing migrates it in place, in one transaction; opened read-only it
    is left untouched and answers like a current store (temporary views stand in for the missing tables).
    """

    def __new__(cls, path: str | Path = DEFAULT_DB, *args: Any, layout: str | None = None, **kwargs: Any) -> TraceStore:
        if cls is TraceStore and _is_dataset(Path(path), layout):
            from moelens.store.dataset import DatasetStore

            cls = DatasetStore
        return super().__new__(cls)

    def __init__(self, path: str | Path = DEFAULT_DB, *, read_only: bool = False, lock_timeout: float = LOCK_TIMEOUT_S,
                 layout: str | None = None):
        self.path = Path(path)
        self.read_only = read_only
        self._session: duckdb.DuckDBPyConnection | None = None
        self._batch: tuple[int, duckdb.DuckDBPyConnection] | None = None  # (thread, connection) of `batch`
        self._shims: tuple[str, ...] = ()
        self.lock_timeout = lock_timeout
        if self.path.is_dir():
            raise StoreError(
                f"{self.path} is a folder but not a moelens Parquet dataset (it has no {DATASET_MARKER}). Give the path "
                f"of a .duckdb file (e.g. {self.path / 'moelens.duckdb'}) or a folder written by `moelens export`."
            )
        if read_only and not self.path.exists():
            raise StoreNotFoundError(
                f"No trace store at {self.path}. Record one first, e.g.\n"
                f"  moelens demo --no-app --db {self.path}\n"
                f"  moelens record MODEL data.txt --db {self.path}"
            )
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_schema()

    def __repr__(self) -> str:
        return f"TraceStore({str(self.path)!r}{', read_only=True' if self.read_only else ''})"

    # -- connections ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[TraceStore]:
        """``with store.session() as s:`` — reads inside share one connection (a copy of the store holds it).

        Opening a DuckDB file costs tens of milliseconds; a page of the app asks for runs, layers, sequences
        and an analysis' arrays, so sharing one connection per bundle of reads keeps a first render fast.
        It is closed when the block ends, so a recorder is never blocked for long.
        """
        shared = copy.copy(self)
        with self.connect() as con:
            shared._session = con
            yield shared

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """``with store.batch():`` — this thread's reads and writes inside share one write connection.

        A recording starts and ends with a few small writes (create the run, its layers; the last rows, the
        totals, the final status); opening the file for each costs tens of milliseconds. The connection is
        closed when the block ends, so other processes wait at most that long; other threads keep their own.
        """
        if self._batch is not None:
            yield
            return
        with self.connect(write=True) as con:
            self._batch = (threading.get_ident(), con)
            try:
                yield
            finally:
                self._batch = None

    @contextlib.contextmanager
    def connect(self, *, write: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; retries while another process holds the lock."""
        if self._batch is not None and self._batch[0] == threading.get_ident():
            yield self._batch[1]
            return
        if self._session is not None and not write:
            yield self._session
            return
        if write and self.read_only:
            raise StoreError(f"{self.path} was opened read-only; open it with read_only=False to change it")
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.02
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=not write and self.path.exists())
                if self._shims and not write:
                    self._apply_shims(con)
                break
            except duckdb.IOException as exc:
                text = str(exc)
                if "lock" in text.lower() or "conflicting" in text.lower():
                    if time.monotonic() > deadline:
                        raise StoreLockedError(
                            f"{self.path} is locked by another process (a recording or another writer) and stayed "
                            f"locked for {self.lock_timeout:.0f}s. Wait for it to finish, or use another --db file."
                        ) from exc
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                raise StoreCorruptError(f"{self.path} is not a readable DuckDB trace store: {text}") from exc
            except duckdb.Error as exc:
                raise StoreCorruptError(
                    f"{self.path} is not a moelens trace store (DuckDB could not open it: {exc}). "
                    "Point --db at a .duckdb file written by moelens, or at a new path to create one."
                ) from exc
        try:
            yield con
        finally:
            con.close()

    def _apply_shims(self, con: duckdb.DuckDBPyConnection) -> None:
        """Stand-ins for what an older file lacks, unless a writer has migrated it since we opened it."""
        if con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [(str(SCHEMA_VERSION),)]:
            self._shims = ()
        for shim in self._shims:
            con.execute(shim)

    def _check_schema(self) -> None:
        """Create the tables in a new file; refuse files of a newer schema or that are not stores."""
        exists = self.path.exists() and self.path.stat().st_size > 0
        if not exists:
            if self.read_only:
                raise StoreNotFoundError(f"No trace store at {self.path}")
            with self.connect(write=True) as con:
                self._create(con)
            return
        with self.connect(write=False) as con:
            try:
                tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            except duckdb.Error as exc:  # pragma: no cover - DuckDB opens but cannot list: treat as corrupt
                raise StoreCorruptError(f"{self.path} is not a moelens trace store: {exc}") from exc
            if "meta" not in tables:
                if tables:
                    raise StoreCorruptError(
                        f"{self.path} is a DuckDB file but not a moelens trace store (it has tables "
                        f"{sorted(tables)[:5]} and no 'meta'). Use another --db path."
                    )
                version = None
            else:
                row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                version = int(row[0]) if row else None
        if version is None:
            if self.read_only:
                raise StoreCorruptError(f"{self.path} has no moelens schema version; it is empty or not a trace store")
            with self.connect(write=True) as con:
                self._create(con)
        elif version > SCHEMA_VERSION:
            raise StoreVersionError(
                f"{self.path} has schema version {version}, newer than this moelens understands ({SCHEMA_VERSION}). "
                "Upgrade moelens (pip install -U moelens) to read it; the file was left untouched."
            )
        elif version < SCHEMA_VERSION:
            if self.read_only:
                with self.connect() as con:
                    self._shims = _shims(con)  # applied by every later read connection
            else:
                with self.connect(write=True) as con:
                    try:
                        _migrate(con, version)
                    except duckdb.Error as exc:
                        raise StoreError(f"{self.path}: migrating schema {version} -> {SCHEMA_VERSION} failed ({str(exc).splitlines()[0]}); "
                                         "the file was left as it was") from exc

    @staticmethod
    def _create(con: duckdb.DuckDBPyConnection) -> None:
        con.execute("BEGIN TRANSACTION")
        for ddl in DDL:
            con.execute(ddl)
        con.execute(
            "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?), ('created_by', ?)",
            [str(SCHEMA_VERSION), f"moelens {_version()}"],
        )
        con.execute("COMMIT")

    # -- runs ----------------------------------------------------------------------------------------

    def create_run(self, model: str, **fields: Any) -> int:
        """Register a new run in state ``recording`` and return its id."""
        values = _run_values({"model": model, **fields})
        with self.connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            run_id = con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()[0]
            _insert_run(con, run_id, values)
            con.execute("COMMIT")
        return int(run_id)

    def finish_run(self, run_id: int, status: str = "complete", error: str | None = None) -> None:
        """Mark a run ``complete`` (after its last append) or ``failed`` (with the reason)."""
        _check_status(status)
        with self.connect(write=True) as con:
            con.execute(_FINISH_SQL, [status, error, run_id])

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set run fields known only after recording starts (e.g. metadata totals)."""
        values = _run_values(fields)
        if not values:
            return
        with self.connect(write=True) as con:
            con.execute(_update_sql(values), [*values.values(), run_id])

    def append(self, run_id: int, tables: Mapping[str, pa.Table | pa.RecordBatch | Mapping[str, Any]], *, shard: int = 0) -> None:
        """Append rows to several per-run tables in one transaction (all or nothing).

        Values are Arrow tables/batches or dicts of columns (numpy arrays or lists) without ``run_id``;
        ``run_id`` is filled in here and types are cast to the store's Arrow schema. ``shard`` names the
        writer's part of the run in the Parquet layout; a DuckDB file has one writer and no shards.
        """
        prepared = _prepare(run_id, tables)
        if not prepared:
            return
        with self.connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                for name, table in prepared:
                    con.register("_moelens_append", table)
                    cols = ", ".join(table.column_names)
                    con.execute(f"INSERT INTO {name} ({cols}) SELECT {cols} FROM _moelens_append")
                    con.unregister("_moelens_append")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def runs(self, status: str | None = None) -> pd.DataFrame:
        """All runs (newest last) with their token and sequence counts."""
        where, params = ("WHERE r.status = ?", [status]) if status else ("", [])
        return self.query(
            f"""SELECT r.run_id, r.name, r.model, r.model_type, r.status, r.n_layers, r.n_experts, r.top_k,
                       r.n_shared_experts, r.dtype, r.device, r.parent_run_id, r.intervention, r.created_at,
                       coalesce(s.n_sequences, 0) AS n_sequences, coalesce(s.n_tokens, 0) AS n_tokens,
                       s.labels
                FROM runs r
                LEFT JOIN (SELECT run_id, count(*) AS n_sequences, sum(n_tokens) AS n_tokens,
                                  string_agg(DISTINCT label, ', ' ORDER BY label) AS labels
                           FROM sequences GROUP BY run_id) s USING (run_id)
                {where} ORDER BY r.run_id""",
            params,
        )

    def run(self, run_id: int) -> dict[str, Any]:
        """One run's row as a dict; raises `RunNotFoundError` with the ids that exist."""
        df = self.query("SELECT * FROM runs WHERE run_id = ?", [int(run_id)])
        if df.empty:
            ids = self.query("SELECT run_id FROM runs ORDER BY run_id")["run_id"].tolist()
            hint = f"Runs in this store: {ids}" if ids else "This store has no runs yet."
            raise RunNotFoundError(f"No run {run_id} in {self.path}. {hint} (list them with: moelens runs --db {self.path})")
        row = df.iloc[0].to_dict()
        for key in ("intervention", "metadata"):
            if isinstance(row.get(key), str):
                row[key] = json.loads(row[key])
        return row

    def layers(self, run_id: int) -> pd.DataFrame:
        """The routed components of a run (layer id, module name, experts, k)."""
        return self.query("SELECT * EXCLUDE (run_id) FROM layers WHERE run_id = ? ORDER BY layer", [int(run_id)])

    def sequences(self, run_id: int) -> pd.DataFrame:
        return self.query("SELECT * EXCLUDE (run_id) FROM sequences WHERE run_id = ? ORDER BY seq_id", [int(run_id)])

    def tokens(self, run_id: int, seq_id: int | None = None) -> pd.DataFrame:
        if seq_id is None:
            return self.query("SELECT * EXCLUDE (run_id) FROM tokens WHERE run_id = ? ORDER BY seq_id, pos", [int(run_id)])
        return self.query(
            "SELECT * EXCLUDE (run_id) FROM tokens WHERE run_id = ? AND seq_id = ? ORDER BY pos", [int(run_id), int(seq_id)]
        )

    def routing(self, run_id: int, seq_id: int | None = None) -> pd.DataFrame:
        """Routing rows (seq_id, pos, layer, rank, expert, weight) of a run, or of one of its sequences."""
        where, params = ("AND seq_id = ?", [int(seq_id)]) if seq_id is not None else ("", [])
        return self.query(
            f"SELECT seq_id, pos, layer, rank, expert, weight FROM routing WHERE run_id = ? {where} "
            "ORDER BY seq_id, pos, layer, rank", [int(run_id), *params])

    def delete_run(self, run_id: int) -> None:
        """Delete a run, all its rows and its summaries in one transaction."""
        self.run(run_id)
        names = self.summary_names(run_id)
        with self.connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            for table in (*RUN_TABLES, *(summary_table(n) for n in sorted(names)), "summaries"):
                con.execute(f'DELETE FROM "{table}" WHERE run_id = ?', [int(run_id)])
            con.execute("DELETE FROM runs WHERE run_id = ?", [int(run_id)])
            con.execute("COMMIT")

    def run_version(self, run_id: int) -> tuple:
        """A cache key for everything derived from a run: ``(store, run_id, finished_at, status)``.

        A finished run is immutable, so this key changes when the run finishes (or is deleted and its id reused),
        never when another run is recorded into the same store. A run still ``recording`` also carries the
        store's current data state, so its key moves with every append.
        """
        row = self.query("SELECT finished_at, status FROM runs WHERE run_id = ?", [int(run_id)])
        if row.empty:
            self.run(run_id)  # raises RunNotFoundError listing the ids
        finished, status = row.iloc[0]
        key = (str(self.path.resolve()), int(run_id), None if pd.isna(finished) else str(finished), str(status))
        return key if status != "recording" else (*key, self._data_state(int(run_id)))

    def _data_state(self, run_id: int) -> tuple:
        """What changes when rows are appended (the file and its write-ahead log)."""
        out = []
        for p in (self.path, self.path.with_name(self.path.name + ".wal")):
            with contextlib.suppress(OSError):
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def shard_ids(self, run_id: int) -> list[int]:
        """The shards a run was written in; a DuckDB file holds each run as the single shard 0."""
        self.run(run_id)
        return [0]

    # -- derived summaries ---------------------------------------------------------------------------

    def write_summary(self, run_id: int, name: str, table: pa.Table) -> None:
        """Store ``table`` as run ``run_id``'s rows of ``summary_<name>``, replacing any earlier ones, atomically.

        The table is created from the Arrow schema (with a leading ``run_id``) the first time; columns a later
        definition adds are added. Summaries are derived from ``routing`` and can always be rebuilt.
        """
        target = _summary_target(name, table)
        self.run(run_id)
        with self.connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.register("_moelens_summary", table)
                con.execute(f'CREATE TABLE IF NOT EXISTS "{target}" AS '
                            "SELECT CAST(NULL AS INTEGER) AS run_id, * FROM _moelens_summary LIMIT 0")
                have = {r[0] for r in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ? AND table_schema = 'main' "
                    "AND table_catalog = current_database()", [target]).fetchall()}
                for column, dtype, *_ in con.execute("DESCRIBE SELECT * FROM _moelens_summary").fetchall():
                    if column not in have:
                        con.execute(f'ALTER TABLE "{target}" ADD COLUMN {_ident(column)} {dtype}')
                cols = ", ".join(_ident(c) for c in table.column_names)
                con.execute(f'DELETE FROM "{target}" WHERE run_id = ?', [int(run_id)])
                con.execute(f'INSERT INTO "{target}" (run_id, {cols}) SELECT ?, {cols} FROM _moelens_summary', [int(run_id)])
                con.execute("DELETE FROM summaries WHERE run_id = ? AND name = ?", [int(run_id), name])
                con.execute("INSERT INTO summaries (run_id, name, n_rows, columns) VALUES (?, ?, ?, ?)",
                            [int(run_id), name, table.num_rows, table.column_names])
                con.unregister("_moelens_summary")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def read_summary(self, run_id: int, name: str) -> pa.Table | None:
        """Run ``run_id``'s rows of ``summary_<name>`` (without ``run_id``), or None if never materialised."""
        target = summary_table(name)
        with self.connect() as con:
            rows = con.execute("SELECT columns FROM summaries WHERE run_id = ? AND name = ?", [int(run_id), name]).fetchall()
            if not rows:
                return None
            row = rows[0]
            cols = ", ".join(_ident(c) for c in row[0])
            return con.sql(f'SELECT {cols} FROM "{target}" WHERE run_id = ?', params=[int(run_id)]).to_arrow_table()

    def summary_names(self, run_id: int) -> set[str]:
        """Names of the summaries materialised for a run."""
        return set(self.query("SELECT name FROM summaries WHERE run_id = ?", [int(run_id)])["name"])

    # -- moving runs between layouts -----------------------------------------------------------------

    def export_parquet(self, run_id: int, folder: str | Path, *, shards: int = 1, overwrite: bool = False) -> list[Path]:
        """Write a run into the Parquet dataset at ``folder`` (created if new) and return the files written.

        Other runs already in the dataset are kept; the same run id again is refused unless ``overwrite``.
        ``shards`` splits the run by whole sequences into that many partitions of similar token counts.
        """
        from moelens.store.transfer import export_run

        return export_run(self, run_id, folder, shards=shards, overwrite=overwrite)

    def import_parquet(self, folder: str | Path, runs: list[int] | None = None) -> dict[int, int]:
        """Load runs of the Parquet dataset at ``folder`` (all, or ``runs``) as new runs; returns {old id: new id}."""
        from moelens.store.transfer import import_runs

        return import_runs(folder, self, runs)

    # -- queries -------------------------------------------------------------------------------------

    def query(self, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
        """Run a read query (use ``?`` placeholders for values) and return a DataFrame."""
        with self.connect() as con:
            return con.execute(sql, params or []).df()

    def arrow(self, sql: str, params: list[Any] | None = None) -> pa.Table:
        """Run a read query and return an Arrow table (zero-copy into numpy for numeric columns)."""
        with self.connect() as con:
            return con.sql(sql, params=params or None).to_arrow_table()


def _is_dataset(path: Path, layout: str | None) -> bool:
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    return layout == "parquet" or (layout is None and (path / DATASET_MARKER).is_file())


def _ident(name: str) -> str:
    """A quoted SQL identifier (summary column names come from analysis code, not users, but quote anyway)."""
    return '"' + str(name).replace('"', '""') + '"'


def _check_status(status: str) -> None:
    if status not in ("complete", "failed"):
        raise ValueError(f"status must be 'complete' or 'failed', not {status!r}")


def _run_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Caller-settable run fields, validated, with JSON fields serialised."""
    unknown = set(fields) - set(RUN_FIELDS)
    if unknown:
        raise TypeError(f"unknown run fields: {sorted(unknown)}")
    return {
        k: json.dumps(v, sort_keys=True) if k in ("intervention", "metadata") and v is not None and not isinstance(v, str) else v
        for k, v in fields.items()
    }


def _insert_run(con: duckdb.DuckDBPyConnection, run_id: int, values: Mapping[str, Any]) -> None:
    """The one INSERT that creates a run row (the DuckDB file, and the Parquet layout's staging table)."""
    cols = list(values)
    con.execute(
        f"INSERT INTO runs (run_id, status, moelens_version, schema_version, {', '.join(cols)}) "
        f"VALUES (?, 'recording', ?, ?, {', '.join('?' for _ in cols)})",
        [int(run_id), _version(), SCHEMA_VERSION, *values.values()],
    )


def _update_sql(values: Mapping[str, Any]) -> str:
    return f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE run_id = ?"


def _prepare(run_id: int, tables: Mapping[str, Any]) -> list[tuple[str, pa.Table]]:
    """Every table of an append converted to the store's Arrow schema (before anything is written)."""
    prepared = []
    for name, data in tables.items():
        if name not in ARROW_SCHEMAS:
            raise ValueError(f"unknown table {name!r}; expected one of {sorted(ARROW_SCHEMAS)}")
        prepared.append((name, _to_arrow(name, run_id, data)))
    return [(n, t) for n, t in prepared if t.num_rows]


def _summary_target(name: str, table: pa.Table) -> str:
    if not isinstance(table, pa.Table):
        raise TypeError(f"a summary is a pyarrow.Table, not {type(table).__name__}")
    if "run_id" in table.column_names:
        raise ValueError("a summary table has no run_id column (the store adds it)")
    return summary_table(name)


def _migrate(con: duckdb.DuckDBPyConnection, version: int) -> None:
    """Bring a store of schema ``version`` to ``SCHEMA_VERSION`` in one transaction (all or nothing)."""
    con.execute("BEGIN TRANSACTION")
    try:
        for step_version, sql in MIGRATIONS:
            if step_version > version:
                con.execute(sql)
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
        con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [f"migrated_from_{version}", f"moelens {_version()}"])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _shims(con: duckdb.DuckDBPyConnection) -> tuple[str, ...]:
    """Temporary views that make a read-only older store answer like a current one: an empty view for each
    missing table, a view adding NULL columns for each table that lacks some (nothing is written)."""
    catalog = con.execute("SELECT current_database()").fetchall()[0][0]
    have: dict[str, set[str]] = {}
    for table, column in con.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_catalog = current_database() "
        "AND table_schema = 'main'"
    ).fetchall():
        have.setdefault(table, set()).add(column)
    out = []
    for table, columns in contract().items():
        if table not in have:
            cols = ", ".join(f"CAST(NULL AS {t}) AS {_ident(c)}" for c, t in columns)
            out.append(f"CREATE TEMP VIEW {_ident(table)} AS SELECT {cols} WHERE false")
        elif missing := [(c, t) for c, t in columns if c not in have[table]]:
            extra = ", ".join(f"CAST(NULL AS {t}) AS {_ident(c)}" for c, t in missing)
            out.append(f"CREATE TEMP VIEW {_ident(table)} AS SELECT *, {extra} FROM {_ident(catalog)}.main.{_ident(table)}")
    return tuple(out)


def _to_arrow(name: str, run_id: int, data: pa.Table | pa.RecordBatch | Mapping[str, Any]) -> pa.Table:
    schema = ARROW_SCHEMAS[name]
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        columns = {c: data.column(c) for c in data.column_names}
    else:
        columns = dict(data)
    n = len(next(iter(columns.values()))) if columns else 0
    arrays = []
    for field in schema:
        if field.name == "run_id":
            arrays.append(pa.array(np.full(n, run_id, dtype=np.int32)))
        elif field.name in columns:
            value = columns[field.name]
            if isinstance(value, (pa.Array, pa.ChunkedArray)):
                arrays.append(value.cast(field.type))
            else:
                arrays.append(pa.array(value, type=field.type))
        else:
            arrays.append(pa.nulls(n, field.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    # Chunks of one DuckDB row group let the insert scan them in parallel.
    return pa.Table.from_batches(table.to_batches(max_chunksize=ROW_GROUP), schema=schema) if n > ROW_GROUP else table
