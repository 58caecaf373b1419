"""A run as a stream of batches of whole sequences, read from the store in bounded memory.

Why whole sequences: SRP/SCH windows, repetition pairs, transitions and the "next token" target need the
context of a sequence and nothing beyond it, so a batch of whole sequences is the largest unit a score's
partial statistics never have to look outside of. Each batch is a `RoutingData` read with bounded SQL
(``WHERE run_id = ? AND seq_id BETWEEN ? AND ?``); layer ids, E, k and label names are those of the whole
run, so partials of different batches line up and merge exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from moelens.analysis.data import PHASES, RoutingData
from moelens.analysis.loading import RangeReader, run_labels
from moelens.errors import InputError

#: Routing slots (token × layer × rank) per batch: ~6 bytes each in the dense arrays (~200 MB), plus the
#: Arrow rows of one read chunk; large enough that per-batch query and numpy overheads stay small.
TARGET_SLOTS = 1 << 25

_Item = TypeVar("_Item")


def check_phase(phase: str | None) -> None:
    if phase is not None and phase not in PHASES:
        raise InputError(f"phase must be one of {PHASES} or None, not {phase!r}")


def sequence_ranges(seq_ids: np.ndarray, sizes: np.ndarray, tokens_per_batch: int) -> list[tuple[int, int]]:
    """Inclusive seq_id ranges of consecutive sequences holding about ``tokens_per_batch`` tokens each (a
    sequence longer than that is a batch of its own; a sequence is never split)."""
    if not len(seq_ids):
        return []
    before = np.cumsum(sizes) - sizes
    group = before // max(int(tokens_per_batch), 1)
    cut = np.r_[0, np.flatnonzero(np.diff(group)) + 1, len(seq_ids)]
    return [(int(seq_ids[a]), int(seq_ids[b - 1])) for a, b in zip(cut[:-1], cut[1:])]


class RunStream:
    """One run of a store, opened for streaming: its context (`meta`: layers and labels, no token), total
    kept tokens and the batch plan. Holds one read connection while open (``with RunStream(...) as s``)."""

    def __init__(self, store: Any, run: int, *, phase: str | None = None, shard: int | None = None, target_slots: int = TARGET_SLOTS):
        check_phase(phase)
        if shard is not None:  # one shard of a partitioned dataset: a view of the store holding that shard alone
            from moelens.store import DatasetStore

            if not isinstance(store, DatasetStore):
                raise InputError(f"shard={shard}: {store.path} is a DuckDB file; shards are folders of a Parquet dataset")
            with store.connect() as con:  # label codes are the whole run's, so every shard's partials line up
                self.label_names = run_labels(con, int(run))
            store = store.only_shard(shard)
        else:
            self.label_names = None
        self.store, self.phase, self.target_slots = store, phase, int(target_slots)
        self.row = store.run(int(run))  # raises RunNotFoundError listing the ids that exist
        self.run = int(run)

    def __enter__(self) -> RunStream:
        self._connection = self.store.connect()
        con = self._connection.__enter__()
        self.reader = RangeReader(con, self.store, self.row, self.phase, self.label_names)
        self.meta = self.reader.empty()
        self.seq_ids, self.sizes = self.reader.sequence_sizes()
        self.n_tokens = int(self.sizes.sum())
        slots_per_token = max(1, int(self.meta.n_layers * self.meta.k_max))
        self.ranges = sequence_ranges(self.seq_ids, self.sizes, self.target_slots // slots_per_token)
        self.planned_tokens = self.n_tokens  #: tokens the batches will read (fewer after `restrict`)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._connection.__exit__(*exc)

    def restrict(self, keep: np.ndarray | None) -> None:
        """Read only the sequences where ``keep`` (bool per `seq_ids`) is True: batches of ~``target_slots``
        kept slots, each one range query that filters out the other sequences inside it (no other row is read)."""
        if keep is None or keep.all():
            return
        self.planned_tokens = int(self.sizes[keep].sum())
        slots_per_token = max(1, int(self.meta.n_layers * self.meta.k_max))
        self.ranges = sequence_ranges(self.seq_ids[keep], self.sizes[keep], self.target_slots // slots_per_token)
        self.reader.only = self.seq_ids[keep]

    def sequences(self) -> Any:
        """seq_id, kept n_tokens and label code (-1 = none) of every sequence with kept tokens."""
        import pandas as pd

        labels = self.reader.fetch("SELECT seq_id, label FROM sequences").to_pandas()
        code = pd.Categorical(labels["label"], categories=list(self.reader.label_names)).codes
        by_id = pd.Series(code, index=labels["seq_id"].to_numpy())
        label = by_id.reindex(self.seq_ids).fillna(-1).to_numpy(np.int32)
        return pd.DataFrame({"seq_id": self.seq_ids, "n_tokens": self.sizes, "label": label})

    def batches(self, *, text: bool = False, logits_layer: int | None = None) -> Iterator[RoutingData]:
        for seq_range in self.ranges:
            yield self.reader.read(seq_range, text=text, logits_layer=logits_layer)

    def read(self, seq_range: tuple[int, int], *, text: bool = False, logits_layer: int | None = None) -> RoutingData:
        return self.reader.read(seq_range, text=text, logits_layer=logits_layer)


def iter_batches(
    store: Any,
    run: int,
    *,
    phase: str | None = None,
    target_slots: int = TARGET_SLOTS,
    shard: int | None = None,
    text: bool = False,
    logits_layer: int | None = None,
) -> Iterator[RoutingData]:
    """The run's tokens (of ``phase``; of one ``shard`` of a partitioned layout) as `RoutingData` batches of
    whole sequences, ~``target_slots`` routing slots each, in seq_id order. ``text`` loads token text and
    ``logits_layer`` that layer's router logits with each batch."""
    with RunStream(store, run, phase=phase, shard=shard, target_slots=target_slots) as stream:
        yield from stream.batches(text=text, logits_layer=logits_layer)


def prefetched(items: Iterable[_Item]) -> Iterator[_Item]:
    """``items``, each produced on a background thread while the caller works on the previous one.

    Why: a streamed pass alternates reading a batch (DuckDB decoding, the scatter kernel) with scoring it
    (numpy and numba kernels); both release the GIL, so on two or more cores reading the next batch while
    the current one is scored hides the shorter of the two. Every step of ``items`` runs on the one
    background thread (so a shared DuckDB connection is never used from two threads at once), and the next
    item is only started once the caller has taken the previous one: at most two items are alive. Errors
    are re-raised in the caller; closing the iterator stops the thread after its current item.
    """
    handoff: list[tuple[str, Any]] = []
    ready, taken = threading.Semaphore(0), threading.Semaphore(0)
    stop = threading.Event()

    def produce() -> None:
        it = iter(items)
        try:
            for item in it:
                handoff.append(("item", item))
                ready.release()
                taken.acquire()
                if stop.is_set():
                    return
            handoff.append(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            handoff.append(("error", exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            ready.release()

    thread = threading.Thread(target=produce, name="moelens-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ready.acquire()
            kind, value = handoff.pop(0)
            if kind == "end":
                return
            if kind == "error":
                raise value
            taken.release()
            yield value
            del value
    finally:
        stop.set()
        taken.release()
        thread.join()


def split_sequences(data: RoutingData, sizes: int | Sequence[int]) -> list[RoutingData]:
    """In-memory ``data`` as consecutive batches of whole sequences: ``sizes`` sequences per batch (one int,
    or a list cycled through) — the in-memory twin of `iter_batches`, for small runs and tests."""
    starts = np.r_[0, np.flatnonzero(np.diff(data.seq_id)) + 1]
    cycle = [int(sizes)] if isinstance(sizes, (int, np.integer)) else [int(s) for s in sizes]
    if not cycle or min(cycle) < 1:
        raise InputError(f"batch sizes must be >= 1 sequences, got {sizes}")
    bounds, i, j = [0], 0, 0
    while i < len(starts):
        i += cycle[j % len(cycle)]
        j += 1
        bounds.append(int(starts[i]) if i < len(starts) else data.n_tokens)
    if data.n_tokens == 0:
        return []
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        mask = np.zeros(data.n_tokens, bool)
        mask[a:b] = True
        out.append(data.select(mask))
    return out


def seq_range(batch: RoutingData) -> tuple[int, int]:
    """Inclusive seq_id range of a (non-empty) batch."""
    return int(batch.seq_id[0]), int(batch.seq_id[-1])
