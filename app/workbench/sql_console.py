"""The SQL console's engine: one read-only SELECT over the trace store, parameters bound, rows capped.

Three locks on writes, so no single mistake opens one: the statement must parse (DuckDB's own parser) as exactly
one SELECT (``WITH`` included), the connection is opened ``read_only``, and external access is off (no
``read_csv('/etc/...')``, no ``COPY ... TO``, no ``ATTACH``). User values go in as bound parameters (``?`` or
``$name``), never into the SQL text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from moelens.errors import InputError

#: Most rows a query returns (the page can lower it).
MAX_ROWS = 10_000

#: The tables a user is expected to query (the store's documented schema).
TABLES = ("runs", "layers", "sequences", "tokens", "routing", "router_logits", "shared_experts")

EXAMPLES: dict[str, tuple[str, str]] = {
    "runs in this store": ("SELECT run_id, name, status, n_experts, top_k, parent_run_id FROM runs ORDER BY run_id", ""),
    "tokens that hit one expert, per label (README)": (
        "-- which tokens hit expert 7 in layer 2, per domain?\n"
        "SELECT s.label, t.token, count(*) AS n\n"
        "FROM routing r JOIN tokens t USING (run_id, seq_id, pos) JOIN sequences s USING (run_id, seq_id)\n"
        "WHERE r.run_id = $run AND r.layer = $layer AND r.expert = $expert AND r.weight > 0\n"
        "GROUP BY ALL ORDER BY n DESC LIMIT 20",
        '{"run": 1, "layer": 2, "expert": 7}',
    ),
    "load per layer and expert": (
        "SELECT layer, expert, count(*) AS slots, round(sum(weight), 2) AS gate_mass\n"
        "FROM routing WHERE run_id = ? AND expert >= 0 AND weight > 0\nGROUP BY ALL ORDER BY layer, expert",
        "[1]",
    ),
    "first choices of one sequence": (
        "SELECT t.pos, t.token, r.layer, r.expert, round(r.weight, 3) AS weight\n"
        "FROM tokens t JOIN routing r USING (run_id, seq_id, pos)\n"
        "WHERE t.run_id = ? AND t.seq_id = ? AND r.rank = 0 ORDER BY t.pos, r.layer",
        "[1, 0]",
    ),
}


def check(sql: str) -> str:
    """``sql`` without a trailing semicolon if it is exactly one SELECT; InputError saying why not otherwise."""
    text = sql.strip().rstrip(";").strip()
    if not text:
        raise InputError("write a SELECT query")
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error as exc:
        raise InputError(f"not valid SQL: {exc}") from exc
    if len(statements) != 1:
        raise InputError(f"one statement at a time, please (got {len(statements)})")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise InputError(f"the console is read-only: only SELECT (and WITH ... SELECT) runs here, not {kind.name}")
    return text


def parse_params(text: str) -> list[Any] | dict[str, Any]:
    """Bound parameters from JSON: a list for ``?`` placeholders, an object for ``$name`` ones."""
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"parameters must be JSON (a list like [1, 2] or an object like {{\"run\": 1}}): {exc}") from exc
    if not isinstance(value, (list, dict)):
        raise InputError("parameters must be a JSON list (for ?) or object (for $name)")
    return value


def run_query(db: str | Path, sql: str, params: list[Any] | dict[str, Any] = (), *, limit: int = MAX_ROWS) -> tuple[pd.DataFrame, bool]:
    """``(rows, truncated)``: at most ``limit`` rows of the one SELECT in ``sql``, over a read-only connection
    with external access off. DuckDB's own errors come back as InputError with its message."""
    text = check(sql)
    limit = max(1, min(int(limit), MAX_ROWS))
    try:
        con = duckdb.connect(str(db), read_only=True, config={"enable_external_access": False})
    except duckdb.Error as exc:
        raise InputError(f"cannot open {db} read-only: {exc}") from exc
    try:
        df = con.execute(f"SELECT * FROM ({text}) AS q LIMIT {limit + 1}", params or None).df()
    except duckdb.Error as exc:
        raise InputError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        con.close()
    return df.head(limit), len(df) > limit


def schema(db: str | Path) -> pd.DataFrame:
    """Columns of the documented tables: ``table, column, type``."""
    df, _ = run_query(db, "SELECT table_name AS \"table\", column_name AS \"column\", data_type AS type "
                          "FROM information_schema.columns WHERE table_schema = 'main' ORDER BY table_name, ordinal_position")
    return df[df["table"].isin(TABLES)].reset_index(drop=True)
