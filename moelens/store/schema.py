"""The trace store's tables: the public SQL contract of moelens.

Every table is long and narrow with small integer ids so DuckDB compresses and scans it fast.
The column names here are documented in the README. Changing the layout is a schema change: edit ``DDL``
(what a new store gets) *and* append the statements that bring an older store there to ``MIGRATIONS``
(what an existing store gets); ``tests/test_store.py`` checks that a migrated v1 store ends with exactly
the tables and columns of a new one.
"""

from __future__ import annotations

import functools
import re

import duckdb
import pyarrow as pa

#: Version of the table layout written by this moelens. A file with a larger number was written by a
#: newer moelens and is refused rather than misread.
SCHEMA_VERSION = 3

#: Run states. A run is ``complete`` only after its last chunk is written; a crash leaves ``recording``
#: (shown as interrupted) and Ctrl-C or an exception leaves ``failed``. A Parquet dataset also reads
#: ``incomplete`` (never stored) for a run stored complete whose shards are no longer whole on disk.
RUN_STATUSES = ("recording", "complete", "failed", "incomplete")

# Output norm ||f_j(x)||_2 of the expert in each routed slot (optional, for pruning scores).
EXPERT_CONTRIBUTIONS = """CREATE TABLE IF NOT EXISTS expert_contributions (
    run_id INTEGER NOT NULL,
    seq_id INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    layer SMALLINT NOT NULL,
    rank UTINYINT NOT NULL,
    norm FLOAT
)"""

# cos(x, x + r) of each MoE block's residual update (optional; EASY-EP, arXiv 2504.06792).
BLOCK_RESIDUALS = """CREATE TABLE IF NOT EXISTS block_residuals (
    run_id INTEGER NOT NULL,
    seq_id INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    layer SMALLINT NOT NULL,
    cos FLOAT
)"""

# Which derived summary tables (``summary_<name>``) hold rows of which run. A summary with zero rows is
# still materialised, which a bare table scan could not tell apart from "never computed".
SUMMARIES = """CREATE TABLE IF NOT EXISTS summaries (
    run_id INTEGER NOT NULL,
    name VARCHAR NOT NULL,
    n_rows BIGINT,
    columns VARCHAR[],
    written_at TIMESTAMP DEFAULT current_timestamp
)"""

DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS meta (
        key VARCHAR PRIMARY KEY,
        value VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id INTEGER PRIMARY KEY,
        name VARCHAR,
        model VARCHAR NOT NULL,
        model_type VARCHAR,
        revision VARCHAR,
        n_layers SMALLINT,
        moe_layers SMALLINT[],
        n_experts SMALLINT,
        top_k SMALLINT,
        n_shared_experts SMALLINT,
        routing_function VARCHAR,
        dtype VARCHAR,
        device VARCHAR,
        created_at TIMESTAMP DEFAULT current_timestamp,
        finished_at TIMESTAMP,
        status VARCHAR NOT NULL DEFAULT 'recording',
        error VARCHAR,
        parent_run_id INTEGER,
        intervention JSON,
        moelens_version VARCHAR,
        schema_version INTEGER,
        metadata JSON,
        -- shards a many-worker recording writes into a Parquet dataset; NULL: whatever shards are on disk
        n_shards INTEGER
    )""",
    # One row per routed component. ``layer`` is the key used by every other table: the model's own block
    # index; a second router in the same block (JetMoE's attention MoA) or a second stack (Switch's decoder)
    # is numbered after the last block, and ``module`` says exactly which module it is.
    """CREATE TABLE IF NOT EXISTS layers (
        run_id INTEGER NOT NULL,
        layer SMALLINT NOT NULL,
        block SMALLINT,
        module VARCHAR,
        kind VARCHAR,
        n_experts SMALLINT,
        top_k SMALLINT,
        has_shared_expert BOOLEAN
    )""",
    """CREATE TABLE IF NOT EXISTS sequences (
        run_id INTEGER NOT NULL,
        seq_id INTEGER NOT NULL,
        label VARCHAR,
        source VARCHAR,
        prompt_len INTEGER,
        n_tokens INTEGER,
        text VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS tokens (
        run_id INTEGER NOT NULL,
        seq_id INTEGER NOT NULL,
        pos INTEGER NOT NULL,
        token_id INTEGER NOT NULL,
        token VARCHAR,
        phase VARCHAR,
        predicted_id INTEGER,
        special VARCHAR
    )""",
    """CREATE TABLE IF NOT EXISTS routing (
        run_id INTEGER NOT NULL,
        seq_id INTEGER NOT NULL,
        pos INTEGER NOT NULL,
        layer SMALLINT NOT NULL,
        rank UTINYINT NOT NULL,
        expert SMALLINT NOT NULL,
        weight FLOAT
    )""",
    """CREATE TABLE IF NOT EXISTS router_logits (
        run_id INTEGER NOT NULL,
        seq_id INTEGER NOT NULL,
        pos INTEGER NOT NULL,
        layer SMALLINT NOT NULL,
        logits FLOAT[]
    )""",
    """CREATE TABLE IF NOT EXISTS shared_experts (
        run_id INTEGER NOT NULL,
        seq_id INTEGER NOT NULL,
        pos INTEGER NOT NULL,
        layer SMALLINT NOT NULL,
        gate FLOAT
    )""",
    EXPERT_CONTRIBUTIONS,
    BLOCK_RESIDUALS,
    SUMMARIES,
)

#: How an older store reaches ``SCHEMA_VERSION``: ``(version, statement)`` pairs in order. Opening an older
#: store for writing runs, in one transaction, every statement whose version is above the store's, then
#: records the new version. Every statement is idempotent (``IF NOT EXISTS``), so a partly migrated
#: file (there is none: the transaction is atomic) or a rerun is harmless. Append; never edit a released step.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (2, EXPERT_CONTRIBUTIONS),
    (2, BLOCK_RESIDUALS),
    (2, SUMMARIES),
    (2, "ALTER TABLE tokens ADD COLUMN IF NOT EXISTS special VARCHAR"),
    (3, "ALTER TABLE runs ADD COLUMN IF NOT EXISTS n_shards INTEGER"),
)

#: Tables that hold per-run rows (deleted with the run, exported with it). ``runs`` itself is last.
RUN_TABLES = (
    "layers", "sequences", "tokens", "routing", "router_logits", "shared_experts", "expert_contributions", "block_residuals",
)

#: Columns that order the rows of a table inside a Parquet shard (the first ones the table has), so that
#: seq_id-range filters skip whole row groups.
SORT_KEYS = ("seq_id", "pos", "layer", "rank")

#: Arrow schemas used for appends: the recorder builds batches with exactly these types.
ARROW_SCHEMAS: dict[str, pa.Schema] = {
    "layers": pa.schema(
        [
            ("run_id", pa.int32()),
            ("layer", pa.int16()),
            ("block", pa.int16()),
            ("module", pa.string()),
            ("kind", pa.string()),
            ("n_experts", pa.int16()),
            ("top_k", pa.int16()),
            ("has_shared_expert", pa.bool_()),
        ]
    ),
    "sequences": pa.schema(
        [
            ("run_id", pa.int32()),
            ("seq_id", pa.int32()),
            ("label", pa.string()),
            ("source", pa.string()),
            ("prompt_len", pa.int32()),
            ("n_tokens", pa.int32()),
            ("text", pa.string()),
        ]
    ),
    "tokens": pa.schema(
        [
            ("run_id", pa.int32()),
            ("seq_id", pa.int32()),
            ("pos", pa.int32()),
            ("token_id", pa.int32()),
            ("token", pa.string()),
            ("phase", pa.string()),
            ("predicted_id", pa.int32()),
            ("special", pa.string()),
        ]
    ),
    "routing": pa.schema(
        [
            ("run_id", pa.int32()),
            ("seq_id", pa.int32()),
            ("pos", pa.int32()),
            ("layer", pa.int16()),
            ("rank", pa.uint8()),
            ("expert", pa.int16()),
            ("weight", pa.float32()),
        ]
    ),
    "router_logits": pa.schema(
        [
            ("run_id", pa.int32()),
            ("seq_id", pa.int32()),
            ("pos", pa.int32()),
            ("layer", pa.int16()),
            ("logits", pa.list_(pa.float32())),
        ]
    ),
    "shared_experts": pa.schema(
        [
            ("run_id", pa.int32()),
            ("seq_id", pa.int32()),
            ("pos", pa.int32()),
            ("layer", pa.int16()),
            ("gate", pa.float32()),
        ]
    ),
    "expert_contributions": pa.schema(
        [
            ("run_id", pa.int32()),
            ("seq_id", pa.int32()),
            ("pos", pa.int32()),
            ("layer", pa.int16()),
            ("rank", pa.uint8()),
            ("norm", pa.float32()),
        ]
    ),
    "block_residuals": pa.schema(
        [
            ("run_id", pa.int32()),
            ("seq_id", pa.int32()),
            ("pos", pa.int32()),
            ("layer", pa.int16()),
            ("cos", pa.float32()),
        ]
    ),
}

#: Columns of ``runs`` a caller may set when creating a run (everything else is managed by the store).
RUN_FIELDS = (
    "name",
    "model",
    "model_type",
    "revision",
    "n_layers",
    "moe_layers",
    "n_experts",
    "top_k",
    "n_shared_experts",
    "routing_function",
    "dtype",
    "device",
    "parent_run_id",
    "intervention",
    "metadata",
    "n_shards",
)


#: Derived summary tables are named ``summary_<name>``; names are plain identifiers because they become SQL
#: table and folder names.
SUMMARY_PREFIX = "summary_"
_SUMMARY_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")


def summary_table(name: str) -> str:
    """The table that holds summary ``name``; refuses names that are not lower-case identifiers."""
    if not isinstance(name, str) or not _SUMMARY_NAME.fullmatch(name):
        raise ValueError(f"summary name must be a lower-case identifier (letters, digits, _), not {name!r}")
    return SUMMARY_PREFIX + name


@functools.cache
def contract() -> dict[str, tuple[tuple[str, str], ...]]:
    """Every table of the current schema with its ``(column, DuckDB type)`` pairs, in order.

    Read from ``DDL`` itself (run in an in-memory database), so the Parquet layout's views and the shims
    that let a read-only older store answer like a current one can never disagree with the file layout.
    """
    con = duckdb.connect()
    try:
        for ddl in DDL:
            con.execute(ddl)
        rows = con.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns ORDER BY table_name, ordinal_position"
        ).fetchall()
    finally:
        con.close()
    out: dict[str, list[tuple[str, str]]] = {}
    for table, column, dtype in rows:
        out.setdefault(table, []).append((column, dtype))
    return {t: tuple(cols) for t, cols in out.items()}
