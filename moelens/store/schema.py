"""The trace store's tables: the public SQL contract of moelens.

Every table is long and narrow with small integer ids so DuckDB compresses and scans it fast.
The column names here are documented in the README; renaming one is a schema change
(bump ``SCHEMA_VERSION`` and add a migration note).
"""

from __future__ import annotations

import pyarrow as pa

#: Version of the table layout written by this moelens. A file with a larger number was written by a
#: newer moelens and is refused rather than misread.
SCHEMA_VERSION = 1

#: Run states. A run is ``complete`` only after its last chunk is written; a crash leaves ``recording``
#: (shown as interrupted) and Ctrl-C or an exception leaves ``failed``.
RUN_STATUSES = ("recording", "complete", "failed")

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
        metadata JSON
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
    # Optional (recorded with --contributions): ‖f_j(x)‖₂ of the expert in routing slot ``rank`` before gating,
    # and cos(x, x + r) of the residual entering the MoE block and after the routed experts are added.
    """CREATE TABLE IF NOT EXISTS expert_contributions (
        run_id INTEGER NOT NULL,
        seq_id INTEGER NOT NULL,
        pos INTEGER NOT NULL,
        layer SMALLINT NOT NULL,
        rank UTINYINT NOT NULL,
        norm FLOAT
    )""",
    """CREATE TABLE IF NOT EXISTS block_residuals (
        run_id INTEGER NOT NULL,
        seq_id INTEGER NOT NULL,
        pos INTEGER NOT NULL,
        layer SMALLINT NOT NULL,
        cos FLOAT
    )""",
)

#: Nullable columns added to version-1 tables: a file written before them gains them in place when it is
#: opened for writing (rows recorded earlier read NULL). ``tokens.special``: a special token's name
#: (``<s>``, ``[INST]``); its ``token`` text is then ``""``.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (("tokens", "special", "VARCHAR"),)

#: Tables that hold per-run rows (deleted with the run, exported with it). ``runs`` itself is last.
RUN_TABLES = ("layers", "sequences", "tokens", "routing", "router_logits", "shared_experts",
              "expert_contributions", "block_residuals")

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
)
