"""Scores as map → merge → finish, so a run of any size streams through in bounded memory.

Every score is a `Chunked`: ``map(batch)`` turns a `RoutingData` batch of whole sequences into partial
statistics (counts, histograms, sums), ``merge(a, b)`` combines two partials exactly and associatively
(integers add exactly; float sums differ from a one-pass sum only by rounding, ~1e-15 relative), and
``finish(partial, ctx)`` makes the result table. `compute` drives it over an in-memory `RoutingData` (one
batch, or split into batches), a store's run (`moelens.analysis.stream`), or the shards of a partitioned
Parquet layout on Ray (`moelens.analysis.distributed`; ``engine="ray"``).

Partials are plain values: numpy arrays, numbers, dicts/lists/tuples of them (merged by addition), or
objects with a ``merge(other)`` method (`Low`, `High`, `Keyed`). A completed run is immutable, so results
on a store are cached by (store path, run id, finished_at, score and parameters) — never by the file.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import reduce
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis.data import RoutingData
from moelens.analysis.loading import run_key
from moelens.analysis.stream import TARGET_SLOTS, RunStream, check_phase, prefetched, seq_range, split_sequences
from moelens.errors import InputError, MoelensError

ENGINES = ("local", "ray")

#: Score results kept per process (small tables; the app asks for the same ones on every interaction).
RESULT_CACHE_SIZE = 128

_results: OrderedDict[tuple[Any, ...], pd.DataFrame] = OrderedDict()
_results_lock = threading.Lock()


@dataclass(frozen=True)
class Context:
    """What `Chunked.finish` (and `prepare`) may know besides the partial: ``meta`` is a token-free
    `RoutingData` with the run's layers, label names, phase filter and origin; ``n_tokens`` the run's kept
    tokens; ``source``/``run`` where it came from."""

    meta: RoutingData
    n_tokens: int
    sequences: pd.DataFrame  #: seq_id, n_tokens (kept), label (code, -1 = none) of every sequence, by seq_id
    chunked: Any = None  #: the score as prepared for this run (what `finish` must be called on)
    max_pass_slots: int | None = None  #: the caller's pass budget; also bounds the summary rows a finish reads
    only_label: str | None = None  #: the one label the score is over (`HOW_OPTIONS`); summaries are read for it alone


class Chunked:
    """Base of every streamed score. Subclasses are frozen dataclasses of the score's parameters (so they
    pickle to Ray workers and their repr is a cache key) and implement `map` and `finish`."""

    text: bool = False  #: batches need token text
    logits_layer: int | None = None  #: batches need this layer's router logits
    paired: bool = False  #: map receives (batch of run a, same sequences of run b)
    #: `from_summaries` reads only label-keyed summaries (through `summary_partials.read`, which keeps the rows
    #: of ``ctx.only_label``), so it also answers a label filter; other scores stream that label's sequences
    label_summaries: bool = False

    def prepare(self, ctx: Context) -> Chunked:
        """The score with anything that must be fixed before mapping decided from the whole run (e.g. SCH's
        sampling stride); default: unchanged."""
        return self

    def select_sequences(self, seq_ids: np.ndarray) -> np.ndarray | None:
        """bool per seq_id: the only sequences `map` needs (None = all), so the stream reads no others."""
        return None

    def map(self, batch: Any) -> Any:
        raise NotImplementedError

    def merge(self, a: Any, b: Any) -> Any:
        return merge_values(a, b)

    def finish(self, partial: Any, ctx: Context) -> pd.DataFrame:
        raise NotImplementedError

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        """The merged partial rebuilt from the run's derived summary tables, or None (then the run is streamed)."""
        return None


@dataclass(frozen=True)
class Fused(Chunked):
    """Several scores' partials (a tuple, in order) from one pass: each batch is read once for all of them.
    From the summaries only when every part finishes from them."""

    parts: tuple[Chunked, ...]

    def __post_init__(self) -> None:
        if any(p.paired or p.logits_layer is not None for p in self.parts):
            raise ValueError("Fused takes unpaired scores that need no router logits")
        object.__setattr__(self, "text", any(p.text for p in self.parts))

    def prepare(self, ctx: Context) -> Fused:
        return Fused(tuple(p.prepare(ctx) for p in self.parts))

    def map(self, batch: Any) -> tuple[Any, ...]:
        return tuple(p.map(batch) for p in self.parts)

    def merge(self, a: Any, b: Any) -> tuple[Any, ...]:
        return tuple(p.merge(x, y) for p, x, y in zip(self.parts, a, b))

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        partials = []
        for p in self.parts:
            partial = p.from_summaries(store, replace(ctx, chunked=p))
            if partial is None:
                return None
            partials.append(partial)
        return tuple(partials)


class Low:
    """A partial merged by element-wise minimum."""

    def __init__(self, value: Any):
        self.value = np.asarray(value)

    def merge(self, other: Low) -> Low:
        return Low(np.minimum(self.value, other.value))


class High:
    """A partial merged by element-wise maximum."""

    def __init__(self, value: Any):
        self.value = np.asarray(value)

    def merge(self, other: High) -> High:
        return High(np.maximum(self.value, other.value))


class Keyed:
    """A sparse table: int64 keys with value columns, each merged by its reducer (``"sum"`` or ``"min"``).
    For partials whose size grows with the data (per token id counts). Merging only queues the other's
    rows; they are grouped (sorted, reduced) once the queue outgrows the grouped part, so streaming B
    batches costs O(n log n) overall instead of re-sorting the whole table per batch."""

    def __init__(self, keys: np.ndarray, columns: dict[str, np.ndarray], reducers: dict[str, str], *, grouped: bool = False):
        self.reducers = reducers
        self._parts = [(np.asarray(keys, np.int64), columns)]
        self._grouped_rows = len(keys) if grouped else 0

    def merge(self, other: Keyed) -> Keyed:
        out = Keyed.__new__(Keyed)
        out.reducers, out._parts, out._grouped_rows = self.reducers, self._parts + other._parts, self._grouped_rows
        if sum(len(k) for k, _ in out._parts) > 2 * max(out._grouped_rows, 1 << 16):
            out._group()
        return out

    def grouped(self) -> Keyed:
        """Self with repeated keys reduced now (call in `map` to keep a batch's partial small)."""
        self._group()
        return self

    def _group(self) -> None:
        keys = np.concatenate([k for k, _ in self._parts])
        uniq, inverse = np.unique(keys, return_inverse=True)
        columns = {}
        for name, how in self.reducers.items():
            values = np.concatenate([c[name] for _, c in self._parts])
            if how == "sum":
                columns[name] = np.bincount(inverse, weights=values, minlength=len(uniq)).astype(values.dtype)
            else:
                acc = np.full(len(uniq), np.iinfo(np.int64).max, np.int64)
                np.minimum.at(acc, inverse, values)
                columns[name] = acc
        self._parts, self._grouped_rows = [(uniq, columns)], len(uniq)

    def table(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(unique sorted keys, reduced columns)."""
        if len(self._parts) > 1 or not self._grouped_rows:
            self._group()
        return self._parts[0]


class Lowest:
    """The ``limit`` rows with the smallest (``key``, ``tiebreak``) — a deterministic sample (keys are
    seeded hashes of token positions) that merges by keeping the lowest rows of both."""

    def __init__(self, key: np.ndarray, tiebreak: np.ndarray, columns: dict[str, np.ndarray], limit: int):
        keep = np.lexsort((tiebreak, key))[:limit]
        self.key, self.tiebreak, self.limit = key[keep], tiebreak[keep], limit
        self.columns = {name: values[keep] for name, values in columns.items()}

    def merge(self, other: Lowest) -> Lowest:
        return Lowest(
            np.r_[self.key, other.key], np.r_[self.tiebreak, other.tiebreak],
            {k: np.concatenate([v, other.columns[k]]) for k, v in self.columns.items()}, self.limit,
        )  # fmt: skip


def position_hash(seq_id: np.ndarray, pos: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 63-bit mix (splitmix64 finaliser) of (seq_id, pos): the order of deterministic token
    samples, the same whatever the batch split."""
    z = (np.asarray(seq_id).astype(np.uint64) << np.uint64(32)) ^ np.asarray(pos).astype(np.uint64)
    z = z ^ np.uint64((int(seed) * 0x9E3779B97F4A7C15) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) >> np.uint64(1)).astype(np.int64)


def position_order(seq_id: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """int64 ``seq_id << 32 | pos``: a token's place in the run, comparable across batches."""
    return (np.asarray(seq_id).astype(np.int64) << 32) | np.asarray(pos).astype(np.int64)


class Firsts:
    """Per key the ``limit`` entries with the smallest order, as ``{key: [(order, value), ...]}``."""

    def __init__(self, items: dict[int, list[tuple[int, Any]]], limit: int):
        self.items, self.limit = items, limit

    def merge(self, other: Firsts) -> Firsts:
        items = dict(self.items)
        for key, values in other.items.items():
            items[key] = sorted(items.get(key, []) + values)[: self.limit]
        return Firsts(items, self.limit)


def merge_values(a: Any, b: Any) -> Any:
    """Exact, associative merge of two partials of the same shape (see the module docstring)."""
    if a is None:
        return b
    if b is None:
        return a
    if hasattr(a, "merge"):
        return a.merge(b)
    if isinstance(a, dict):
        return {k: merge_values(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(merge_values(x, y) for x, y in zip(a, b))
    return a + b


def merge_all(chunked: Chunked, partials: Iterable[Any]) -> Any:
    return reduce(lambda a, b: b if a is None else chunked.merge(a, b), partials, None)


def compute(chunked: Chunked, source: Any, run: int | None = None, **options: Any) -> pd.DataFrame:
    """``chunked``'s result table on ``source`` (see `compute_partial` for the options); on a store's
    completed run the result is cached by (store path, run id, finished_at, score and parameters)."""
    from moelens.store import TraceStore

    key = None
    if isinstance(source, TraceStore) and run is not None:
        key = _result_key(chunked, source, int(run), options.get("phase"), options.get("source_b"), options.get("run_b"),
                          options.get("only_label"))
    with _results_lock:
        if key is not None and key in _results:
            _results.move_to_end(key)
            return _copy(_results[key])
    partial, ctx = compute_partial(chunked, source, run, **options)
    df = ctx.chunked.finish(partial, ctx)
    if key is not None:
        with _results_lock:
            _results[key] = _copy(df)
            while len(_results) > RESULT_CACHE_SIZE:
                _results.popitem(last=False)
    return df


#: How a score runs rather than what it computes: accepted by every score function next to its parameters
#: (``progress(done, total)`` is called after each streamed batch; ``max_pass_slots`` refuses, with
#: `NeedsFullPass`, a streamed pass over more routing slots than that — what an interactive caller such as
#: the app uses to put a long pass behind a button instead of starting it on its own; ``only_label`` scores
#: the tokens of the sequences with that label alone, as if the run held nothing else, reading no other
#: sequence from the store — a page's label filter, in the memory of one batch).
HOW_OPTIONS = ("engine", "address", "batches", "target_slots", "progress", "max_pass_slots", "only_label")


class NeedsFullPass(MoelensError):
    """The result needs a streamed pass over the run's routing (it cannot finish from the derived summaries)
    and the pass is larger than the caller's ``max_pass_slots``."""

    def __init__(self, what: str, n_tokens: int, n_slots: int, n_batches: int, unit: str = "routing slots"):
        self.what, self.n_tokens, self.n_slots, self.n_batches = what, n_tokens, n_slots, n_batches
        super().__init__(f"{what} needs a pass over {n_tokens:,} tokens ({n_slots:,} {unit}, {n_batches} batches)")


def compute_partial(
    chunked: Chunked,
    source: Any,
    run: int | None = None,
    *,
    phase: str | None = None,
    engine: str = "local",
    address: str | None = None,
    batches: int | Sequence[int] | None = None,
    target_slots: int = TARGET_SLOTS,
    source_b: Any = None,
    run_b: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_pass_slots: int | None = None,
    only_label: str | None = None,
) -> tuple[Any, Context]:
    """The merged partial of a `Chunked` score and its `Context`, on a `RoutingData` (one batch, or ``batches`` sequences per batch) or a store's
    run (streamed in batches of ~``target_slots`` routing slots; ``engine="ray"`` maps the shards of a
    partitioned Parquet store on a Ray cluster at ``address``, None = a local one). Paired scores take the
    second run as (``source_b``, ``run_b``). ``progress``, ``max_pass_slots`` and ``only_label``: see `HOW_OPTIONS`."""
    from moelens.store import TraceStore

    check_phase(phase)
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {ENGINES}, not {engine!r}")
    if chunked.paired and source_b is None:
        raise InputError("give the second run: source_b (and run_b)")
    if isinstance(source, RoutingData) or isinstance(source_b, RoutingData):
        return _in_memory(chunked, source, run, phase, batches, source_b, run_b, only_label)
    if not isinstance(source, TraceStore):
        raise TypeError(f"source must be a TraceStore or a RoutingData, not {type(source).__name__}")
    if run is None:
        raise InputError("give the run id: score(store, run, ...)")
    return _streamed(chunked, source, int(run), phase, engine, address, target_slots, source_b, run_b, progress, max_pass_slots,
                     only_label)


def context(source: Any, run: int | None = None, *, phase: str | None = None) -> Context:
    """The `Context` of a source (layers, labels, sequence sizes) without a pass over its routing."""
    from moelens.analysis._common import resolve

    check_phase(phase)
    if isinstance(source, RoutingData):
        return _data_context(resolve(source, phase=phase))
    if run is None:
        raise InputError("give the run id: score(store, run, ...)")
    with RunStream(source, int(run), phase=phase) as stream:
        return Context(stream.meta, stream.n_tokens, stream.sequences())


def _data_context(data: RoutingData) -> Context:
    starts = np.r_[0, np.flatnonzero(np.diff(data.seq_id)) + 1] if data.n_tokens else np.zeros(0, np.int64)
    sequences = pd.DataFrame(
        {"seq_id": data.seq_id[starts], "n_tokens": np.diff(np.r_[starts, data.n_tokens]), "label": data.label[starts]}
    )
    return Context(data.select(np.zeros(data.n_tokens, bool)), data.n_tokens, sequences)


def label_sequences(ctx: Context, label: str | None) -> np.ndarray | None:
    """bool per sequence of ``ctx``: those labelled ``label`` (None: no label filter)."""
    if label is None:
        return None
    names = list(ctx.meta.label_names)
    if label not in names:
        where = "" if ctx.meta.origin is None else f"run {ctx.meta.origin.run_id} "
        raise InputError(f"{where}has no label {label!r}; its labels are {names or 'none (record with --label)'}")
    return ctx.sequences["label"].to_numpy() == names.index(label)


def only_sequences(ctx: Context, keep: np.ndarray | None) -> Context:
    """``ctx`` as if its run held only the sequences where ``keep`` (bool per sequence) is True."""
    if keep is None:
        return ctx
    sequences = ctx.sequences[keep].reset_index(drop=True)
    return replace(ctx, sequences=sequences, n_tokens=int(sequences["n_tokens"].sum()))


def both(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """The and of two optional sequence masks (None = every sequence)."""
    return b if a is None else a if b is None else a & b


def clear_results() -> None:
    with _results_lock:
        _results.clear()


def _copy(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    out.attrs = copy.deepcopy(df.attrs)
    return out


def _result_key(chunked: Chunked, store: Any, run: int, phase: str | None, source_b: Any, run_b: int | None,
                only_label: str | None) -> tuple[Any, ...] | None:
    key = run_key(store.run(run), store.path)
    if key is None:
        return None
    second: Any = None
    if chunked.paired:
        if not hasattr(source_b, "run"):
            return None
        second = run_key(source_b.run(int(run_b)), source_b.path)  # type: ignore[arg-type]
        if second is None:
            return None
    return (*key, phase, repr(chunked), second, only_label)


def _in_memory(
    chunked: Chunked, source: Any, run: int | None, phase: str | None, batches: Any, source_b: Any, run_b: int | None,
    only_label: str | None,
) -> tuple[Any, Context]:
    from moelens.analysis._common import resolve

    data = resolve(source, run, phase=phase)
    if only_label is not None:
        label_sequences(_data_context(data), only_label)  # refuses an unknown label
        data = data.select(data.label == data.label_names.index(only_label))
    ctx = _data_context(data)
    chunked = chunked.prepare(ctx)
    ctx = replace(ctx, chunked=chunked)
    wanted = chunked.select_sequences(np.unique(data.seq_id))
    if wanted is not None:
        data = data.select(np.isin(data.seq_id, np.unique(data.seq_id)[wanted]))
    parts: list[Any] = [data] if batches is None or data.n_tokens == 0 else split_sequences(data, batches)
    if chunked.paired:
        other = resolve(source_b, run_b, phase=phase)
        parts = [(p, _same_sequences(other, p)) for p in parts]
    partial = merge_all(chunked, (chunked.map(p) for p in parts))
    if partial is None:
        partial = chunked.map((ctx.meta, ctx.meta) if chunked.paired else ctx.meta)
    return partial, ctx


def _same_sequences(data: RoutingData, batch: RoutingData) -> RoutingData:
    if batch.n_tokens == 0:
        return data.select(np.zeros(data.n_tokens, bool))
    lo, hi = seq_range(batch)
    return data.select((data.seq_id >= lo) & (data.seq_id <= hi))


def _streamed(
    chunked: Chunked, store: Any, run: int, phase: str | None, engine: str, address: str | None, target_slots: int,
    source_b: Any, run_b: int | None, progress: Callable[[int, int], None] | None, max_pass_slots: int | None,
    only_label: str | None,
) -> tuple[Any, Context]:  # fmt: skip
    with RunStream(store, run, phase=phase, target_slots=target_slots) as stream:
        ctx = Context(stream.meta, stream.n_tokens, stream.sequences())
        keep = label_sequences(ctx, only_label)
        ctx = only_sequences(ctx, keep)
        chunked = chunked.prepare(ctx)
        ctx = replace(ctx, chunked=chunked, max_pass_slots=max_pass_slots, only_label=only_label)
        stream.restrict(both(keep, chunked.select_sequences(stream.seq_ids)))
        summaries = engine == "local" and (keep is None or chunked.label_summaries)
        partial = chunked.from_summaries(store, ctx) if summaries else None
        if partial is None and max_pass_slots is not None:
            n_slots = int(stream.meta.n_layers * stream.meta.k_max) * stream.planned_tokens
            if n_slots > max_pass_slots:
                raise NeedsFullPass(type(chunked).__name__, stream.planned_tokens, n_slots, len(stream.ranges))
        if partial is None and engine == "ray":
            from moelens.analysis.distributed import map_shards

            partial = map_shards(chunked, store, run, phase, target_slots, address, run_b, only_label)
        elif partial is None:
            partial = merge_all(chunked, (chunked.map(p) for p in _reporting(prefetched(stream_partials(chunked, stream, source_b, run_b)),
                                                                             len(stream.ranges), progress)))
        if partial is None:
            partial = chunked.map((ctx.meta, ctx.meta) if chunked.paired else ctx.meta)
    return partial, ctx


def _reporting(items: Iterable[Any], total: int, progress: Callable[[int, int], None] | None) -> Iterable[Any]:
    """``items``, calling ``progress(done, total)`` after each one is consumed."""
    for done, item in enumerate(items, 1):
        yield item
        if progress is not None:
            progress(done, total)


def stream_partials(chunked: Chunked, stream: RunStream, source_b: Any = None, run_b: int | None = None) -> Iterable[Any]:
    """The map inputs of one open run stream: batches, or (batch, same sequences of run b) pairs."""
    if not chunked.paired:
        yield from stream.batches(text=chunked.text, logits_layer=chunked.logits_layer)
        return
    with RunStream(source_b, int(run_b), phase=stream.phase) as other:  # type: ignore[arg-type]
        other.reader.only = stream.reader.only  # run b: the same sequences as run a's batch, no others
        for batch in stream.batches(text=chunked.text, logits_layer=chunked.logits_layer):
            yield batch, other.read(seq_range(batch))
