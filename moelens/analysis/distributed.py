"""The distributed engine: the map step of a score runs on Ray, one task per shard of a partitioned Parquet
store, and the driver merges the partials.

Why Ray: partials are numpy-heavy Python objects that Ray's object store moves without copies, tasks are
plain functions, and the same code runs on a laptop (``ray.init()``) or a cluster (``address``). Each task
opens the store itself, read-only, and streams its shard in bounded memory, so no worker ever holds more
than a batch. ray is imported only here, on first use.
"""

from __future__ import annotations

from typing import Any

from moelens.analysis.chunked import Chunked, Context, both, label_sequences, merge_all, stream_partials
from moelens.analysis.stream import RunStream
from moelens.errors import InputError


def map_shard(path: str, run: int, shard: int, phase: str | None, chunked: Chunked, target_slots: int, run_b: int | None,
              only_label: str | None = None) -> Any:
    """The merged partial of one shard (runs inside a Ray worker); ``only_label``: that label's sequences alone."""
    from moelens.store import TraceStore

    store = TraceStore(path, read_only=True)  # the second run of a paired score is read from the whole store
    with RunStream(store, run, phase=phase, shard=shard, target_slots=target_slots) as stream:
        keep = label_sequences(Context(stream.meta, stream.n_tokens, stream.sequences()), only_label)
        stream.restrict(both(keep, chunked.select_sequences(stream.seq_ids)))
        return merge_all(chunked, (chunked.map(p) for p in stream_partials(chunked, stream, store if run_b is not None else None, run_b)))


def map_shards(chunked: Chunked, store: Any, run: int, phase: str | None, target_slots: int, address: str | None, run_b: int | None,
               only_label: str | None = None) -> Any:
    """Map every shard of ``run`` on Ray (connecting to ``address``, or starting/using a local cluster) and
    merge the partials on the driver in shard order."""
    from moelens.store import DatasetStore

    if not isinstance(store, DatasetStore):
        raise InputError(
            f"engine='ray' reads a partitioned Parquet store (a folder); {store.path} is a DuckDB file. "
            "Export the run first (moelens export), or use the default engine."
        )
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray ships with the dev environment
        raise InputError("engine='ray' needs ray: pip install 'ray[default]'") from exc
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    task = ray.remote(map_shard)
    shards = store.shard_ids(run)
    futures = [task.remote(str(store.path), run, shard, phase, chunked, target_slots, run_b, only_label) for shard in shards]
    return merge_all(chunked, ray.get(futures))
