"""`TraceStore`: one DuckDB file holding many routing runs.

Connections are short-lived on purpose. DuckDB lets one process write *or* many processes read a file;
by opening a connection only for the duration of one append or one query, a recorder and the app can
share a store: each waits briefly (with retries) for the other's lock instead of failing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
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
from moelens.store.schema import ARROW_SCHEMAS, DDL, RUN_FIELDS, RUN_TABLES, SCHEMA_VERSION

DEFAULT_DB = Path("traces") / "moelens.duckdb"

#: DuckDB's row-group size; appends are cut into Arrow batches of this many rows.
ROW_GROUP = 122_880

#: How long to keep retrying when another process holds the file lock.
LOCK_TIMEOUT_S = 30.0


def _version() -> str:
    from moelens import __version__

    return __version__


class TraceStore:
    """A moelens trace store (DuckDB file).

    ``TraceStore(path)`` creates the file if needed; ``TraceStore(path, read_only=True)`` never writes and
    refuses a missing file. Every method opens its own connection, so the object is cheap and safe to keep.
    """

    def __init__(self, path: str | Path = DEFAULT_DB, *, read_only: bool = False, lock_timeout: float = LOCK_TIMEOUT_S):
        self.path = Path(path)
        self.read_only = read_only
        self._session: duckdb.DuckDBPyConnection | None = None
        self.lock_timeout = lock_timeout
        self.parquet = self.path.is_dir() and (self.path / "runs").is_dir()
        if self.parquet:  # the partitioned layout: read-only, DuckDB queries the files in place
            self.read_only = True
            return
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder; give the path of a .duckdb file inside it, e.g. {self.path / 'moelens.duckdb'}")
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
    def connect(self, *, write: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection; retries while another process holds the lock."""
        if self._session is not None and not write:
            yield self._session
            return
        if self.parquet and not write:
            with _parquet_views(self.path) as con:
                yield con
            return
        if write and self.read_only:
            raise StoreError(f"{self.path} was opened read-only; open it with read_only=False to change it")
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.02
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=not write and self.path.exists())
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
        unknown = set(fields) - set(RUN_FIELDS)
        if unknown:
            raise TypeError(f"unknown run fields: {sorted(unknown)}")
        values = {"model": model, **fields}
        for key in ("intervention", "metadata"):
            if key in values and values[key] is not None and not isinstance(values[key], str):
                values[key] = json.dumps(values[key], sort_keys=True)
        cols = list(values)
        with self.connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            run_id = con.execute("SELECT coalesce(max(run_id), 0) + 1 FROM runs").fetchone()[0]
            con.execute(
                f"INSERT INTO runs (run_id, status, moelens_version, schema_version, {', '.join(cols)}) "
                f"VALUES (?, 'recording', ?, ?, {', '.join('?' for _ in cols)})",
                [run_id, _version(), SCHEMA_VERSION, *values.values()],
            )
            con.execute("COMMIT")
        return int(run_id)

    def finish_run(self, run_id: int, status: str = "complete", error: str | None = None) -> None:
        """Mark a run ``complete`` (after its last append) or ``failed`` (with the reason)."""
        if status not in ("complete", "failed"):
            raise ValueError(f"status must be 'complete' or 'failed', not {status!r}")
        with self.connect(write=True) as con:
            con.execute(
                "UPDATE runs SET status = ?, error = ?, finished_at = current_timestamp WHERE run_id = ?",
                [status, error, run_id],
            )

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set run fields known only after recording starts (e.g. metadata totals)."""
        unknown = set(fields) - set(RUN_FIELDS)
        if unknown:
            raise TypeError(f"unknown run fields: {sorted(unknown)}")
        if not fields:
            return
        values = {k: (json.dumps(v, sort_keys=True) if k in ("intervention", "metadata") and v is not None and not isinstance(v, str) else v) for k, v in fields.items()}
        sets = ", ".join(f"{k} = ?" for k in values)
        with self.connect(write=True) as con:
            con.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", [*values.values(), run_id])

    def append(self, run_id: int, tables: Mapping[str, pa.Table | pa.RecordBatch | Mapping[str, Any]]) -> None:
        """Append rows to several per-run tables in one transaction (all or nothing).

        Values are Arrow tables/batches or dicts of columns (numpy arrays or lists) without ``run_id``;
        ``run_id`` is filled in here and types are cast to the store's Arrow schema.
        """
        prepared: list[tuple[str, pa.Table]] = []
        for name, data in tables.items():
            if name not in ARROW_SCHEMAS:
                raise ValueError(f"unknown table {name!r}; expected one of {sorted(ARROW_SCHEMAS)}")
            prepared.append((name, _to_arrow(name, run_id, data)))
        prepared = [(n, t) for n, t in prepared if t.num_rows]
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
        """Delete a run and all its rows in one transaction."""
        self.run(run_id)
        with self.connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            for table in RUN_TABLES:
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [int(run_id)])
            derived = con.execute("SELECT table_name FROM information_schema.tables WHERE table_name LIKE 'summar%'").fetchall()
            for (table,) in derived:  # summary_<name> tables and their registry
                con.execute(f"DELETE FROM {table} WHERE run_id = ?", [int(run_id)])
            con.execute("DELETE FROM runs WHERE run_id = ?", [int(run_id)])
            con.execute("COMMIT")

    def export_parquet(self, run_id: int, folder: str | Path) -> list[Path]:
        """Write the run's rows as one Parquet file per table (the scale-out layout) and return the paths."""
        self.run(run_id)
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        with self.connect() as con:
            for table in ("runs", *RUN_TABLES):
                path = out / f"{table}.parquet"
                con.execute(
                    f"COPY (SELECT * FROM {table} WHERE run_id = ?) TO '{_sql_path(path)}' (FORMAT PARQUET)", [int(run_id)]
                )
                written.append(path)
        return written

    def shard_ids(self, run_id: int) -> list[int]:
        """Shards of a run in the partitioned Parquet layout ([0] for a DuckDB file: one shard)."""
        if not self.parquet:
            return [0]
        folder = self.path / "tokens" / f"run_id={int(run_id)}"
        return sorted(int(p.name.split("=", 1)[1]) for p in folder.glob("shard=*")) if folder.is_dir() else []

    # -- derived summaries (minimal version for the analysis; the layout work owns the final one) -----

    def write_summary(self, run_id: int, name: str, table: pa.Table) -> None:
        """Replace run ``run_id``'s rows of the derived table ``summary_<name>`` with ``table`` (no run_id
        column: it is added here), and record that the summary is materialised. One transaction."""
        target = _summary_table(name)
        self.run(run_id)
        if "run_id" in table.column_names:
            raise ValueError("a summary table must not have a run_id column; the store adds it")
        rows = table.add_column(0, "run_id", pa.array(np.full(table.num_rows, run_id, np.int32)))
        with self.connect(write=True) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.register("_moelens_summary", rows)
                con.execute(f"CREATE TABLE IF NOT EXISTS {target} AS SELECT * FROM _moelens_summary LIMIT 0")
                con.execute(f"DELETE FROM {target} WHERE run_id = ?", [int(run_id)])
                con.execute(f"INSERT INTO {target} BY NAME SELECT * FROM _moelens_summary")
                con.unregister("_moelens_summary")
                con.execute("CREATE TABLE IF NOT EXISTS summaries (run_id INTEGER, name VARCHAR, written_at TIMESTAMP)")
                con.execute("DELETE FROM summaries WHERE run_id = ? AND name = ?", [int(run_id), name])
                con.execute("INSERT INTO summaries VALUES (?, ?, current_timestamp)", [int(run_id), name])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def read_summary(self, run_id: int, name: str) -> pa.Table | None:
        """Run ``run_id``'s rows of ``summary_<name>`` (without run_id), or None if not materialised."""
        target = _summary_table(name)
        if name not in self.summary_names(run_id):
            return None
        with self.connect() as con:
            return con.sql(f"SELECT * EXCLUDE (run_id) FROM {target} WHERE run_id = ?", params=[int(run_id)]).to_arrow_table()

    def summary_names(self, run_id: int) -> set[str]:
        """Names of the summaries materialised for a run."""
        if self.parquet:
            return set()
        with self.connect() as con:
            if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'summaries'").fetchall()[0][0]:
                return set()
            return {r[0] for r in con.execute("SELECT name FROM summaries WHERE run_id = ?", [int(run_id)]).fetchall()}

    # -- queries -------------------------------------------------------------------------------------

    def query(self, sql: str, params: list[Any] | None = None) -> pd.DataFrame:
        """Run a read query (use ``?`` placeholders for values) and return a DataFrame."""
        with self.connect() as con:
            return con.execute(sql, params or []).df()

    def arrow(self, sql: str, params: list[Any] | None = None) -> pa.Table:
        """Run a read query and return an Arrow table (zero-copy into numpy for numeric columns)."""
        with self.connect() as con:
            return con.sql(sql, params=params or None).to_arrow_table()


@contextlib.contextmanager
def _parquet_views(folder: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection with one view per table of a partitioned Parquet dataset
    (``folder/<table>/run_id=R/shard=S/*.parquet``, hive partitioning); empty tables where a folder is
    absent. Minimal reader of the scale-out layout (the layout work owns export and import)."""
    con = duckdb.connect()
    try:
        for table in ("runs", *RUN_TABLES):
            files = folder / table
            if any(files.rglob("*.parquet")):
                glob = _sql_path(files / "**" / "*.parquet")
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{glob}', hive_partitioning = true, union_by_name = true)")
            else:
                con.register("_moelens_empty", ARROW_SCHEMAS[table].empty_table() if table in ARROW_SCHEMAS else pa.table({"run_id": pa.array([], pa.int32())}))
                con.execute(f"CREATE TABLE {table} AS SELECT *, 0 AS shard FROM _moelens_empty")
                con.unregister("_moelens_empty")
        yield con
    finally:
        con.close()


def _summary_table(name: str) -> str:
    """``summary_<name>``, for names that are plain identifiers (they are spliced into SQL)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"summary names are lower-case identifiers, not {name!r}")
    return f"summary_{name}"


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


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
