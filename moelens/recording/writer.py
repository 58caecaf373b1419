"""Buffer recorded rows and flush them to the store in bounded chunks.

Memory stays bounded on long recordings: rows are held only until ``flush_tokens`` tokens have
accumulated, then written in one transaction (so a sequence's tokens, routing and metadata land together).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from moelens.store import TraceStore


class RunWriter:
    """Accumulates column blocks per table for one run and appends them to the store."""

    def __init__(self, store: TraceStore, run_id: int, flush_tokens: int = 65_536):
        self.store = store
        self.run_id = run_id
        self.flush_tokens = flush_tokens
        self._blocks: dict[str, list[dict]] = defaultdict(list)
        self._pending_tokens = 0
        self.n_tokens = 0
        self.n_sequences = 0
        self.n_routing_rows = 0

    def add(self, tables: dict[str, dict], n_tokens: int, n_sequences: int) -> None:
        for name, columns in tables.items():
            if columns and len(next(iter(columns.values()))):
                self._blocks[name].append(columns)
        self._pending_tokens += n_tokens
        self.n_tokens += n_tokens
        self.n_sequences += n_sequences
        if self._pending_tokens >= self.flush_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._blocks:
            return
        merged = {name: _merge(blocks) for name, blocks in self._blocks.items()}
        self.n_routing_rows += len(merged.get("routing", {}).get("expert", ()))
        self.store.append(self.run_id, merged)
        self._blocks.clear()
        self._pending_tokens = 0


def _merge(blocks: list[dict]) -> dict:
    if len(blocks) == 1:
        return blocks[0]
    out = {}
    for name in blocks[0]:
        parts = [b[name] for b in blocks]
        if isinstance(parts[0], np.ndarray):
            out[name] = np.concatenate(parts)
        elif hasattr(parts[0], "type"):  # pyarrow arrays
            import pyarrow as pa

            out[name] = pa.concat_arrays(parts)
        else:
            out[name] = [v for part in parts for v in part]
    return out
