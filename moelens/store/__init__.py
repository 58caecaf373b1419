"""The trace store: schema, runs, appends and read-only queries over a DuckDB file or a Parquet dataset (no torch)."""

from moelens.store.dataset import DatasetStore
from moelens.store.schema import SCHEMA_VERSION
from moelens.store.store import DEFAULT_DB, TraceStore

__all__ = ["DEFAULT_DB", "SCHEMA_VERSION", "DatasetStore", "TraceStore"]
