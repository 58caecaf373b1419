"""Buffer recorded rows and flush them to the store in bounded chunks.

Memory stays bounded on long recordings: rows are held only until ``flush_tokens`` tokens have
accumulated, then written in one transaction (so a sequence's tokens, routing and metadata land together).
A worker of a distributed recording writes its own ``shard`` and shifts its local sequence ids by ``seq_offset``
(the first id the driver gave it), so the recording loop itself numbers sequences from 0 either way.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Callable
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


#: A unit of recorded work, run on the writer thread: waits for its host copies, returns
#: ``(tables, n_tokens, n_sequences)`` for `RunWriter.add`.
Job = Callable[[], tuple[dict[str, dict], int, int]]


class BackgroundWriter:
    """Runs `Job`s on one writer thread and appends what they build through a `RunWriter`.

    The recorder only launches forwards and queues their (still in flight) device-to-host copies, so on an
    accelerator the next forward starts while this thread waits for the copies, builds columns and writes.
    The queue holds at most ``max_pending`` jobs: a recorder faster than its writer blocks instead of
    holding ever more routing in memory. ``max_pending=0`` runs each job at once in the caller (no thread).

    A job that raises stops the writing: the error is raised again in the caller, by the next `submit` or
    on leaving the context, so a run is never marked complete over a lost block. Leaving the context on an
    exception (Ctrl-C included) drops the queued jobs; the thread is always joined.
    """

    def __init__(self, writer: RunWriter, max_pending: int = 2):
        if max_pending < 0:
            raise ValueError("max_pending must be >= 0")
        self.writer = writer
        self._queue: queue.Queue[Job | None] | None = queue.Queue(maxsize=max_pending) if max_pending else None
        self._error: BaseException | None = None
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="moelens-writer", daemon=True) if self._queue else None

    def __enter__(self) -> BackgroundWriter:
        if self._thread is not None:
            self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        """Queue ``job`` (blocks while ``max_pending`` jobs wait); raises the error of an earlier job."""
        self._raise_error()
        if self._queue is None:
            self._run(job)
        else:
            self._queue.put(job)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._thread is not None:
            if exc_type is not None:
                self._abandon.set()
            self._queue.put(None)
            self._thread.join()
        if exc_type is None:
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self, job: Job) -> None:
        tables, n_tokens, n_sequences = job()
        self.writer.add(tables, n_tokens=n_tokens, n_sequences=n_sequences)

    def _drain(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None and not self._abandon.is_set():  # after a failure: consume, never block the caller
                try:
                    self._run(job)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                    self._error = exc


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
