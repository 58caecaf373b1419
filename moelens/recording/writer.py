"""Buffer recorded rows and flush them to the store in bounded chunks.

Memory stays bounded on long recordings: rows are held only until ``flush_tokens`` tokens have
accumulated, then written in one transaction (so a sequence's tokens, routing and metadata land together).
A worker of a distributed recording writes its own ``shard`` and shifts its local sequence ids by ``seq_offset``
(the first id the driver gave it), so the recording loop itself numbers sequences from 0 either way.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from moelens.store import TraceStore


@dataclass(frozen=True)
class ShardTarget:
    """Where one worker of a distributed recording writes: shard ``shard`` of the driver's run ``run_id``, its
    sequences numbered from ``first_seq_id`` (the driver numbers all sequences once, so ids never depend on
    which worker ran first)."""

    run_id: int
    shard: int
    first_seq_id: int


class RunWriter:
    """Accumulates column blocks per table for one run and appends them to the store."""

    def __init__(self, store: TraceStore, run_id: int, flush_tokens: int = 65_536, *, shard: int = 0, seq_offset: int = 0):
        self.store = store
        self.run_id = run_id
        self.shard = shard
        self.seq_offset = seq_offset
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
        if self.seq_offset:
            for columns in merged.values():
                if "seq_id" in columns:
                    columns["seq_id"] = np.asarray(columns["seq_id"], dtype=np.int32) + np.int32(self.seq_offset)
        self.store.append(self.run_id, merged, shard=self.shard)
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
