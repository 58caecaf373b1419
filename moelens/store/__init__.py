"""The DuckDB trace store: schema, runs, appends and read-only queries (no torch here)."""

from moelens.store.schema import SCHEMA_VERSION
from moelens.store.store import DEFAULT_DB, TraceStore

__all__ = ["DEFAULT_DB", "SCHEMA_VERSION", "TraceStore"]
