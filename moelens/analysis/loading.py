"""Read a `TraceStore` run, or a range of its sequences, into a `RoutingData`, fast.

Why this shape: a run of 1M tokens × 48 layers × top-8 is 400M routing rows. Sorting them in SQL or looping
over them in Python takes minutes; instead the routing rows (of the whole run, or of ``seq_id BETWEEN ? AND
?`` for one batch of the stream) are read as Arrow record batches (bounded memory, no ORDER BY) and each is
scattered straight into the dense ``[layer, token, rank]`` arrays at ``token index = sequence offset + pos``.
Scores stream batches (`moelens.analysis.stream`); a whole-run load (`load_run`) is for small runs, tests
and token-level views, and is cached by (store path, run id, finished_at): a completed run never changes.
"""

from __future__ import annotations

import contextlib

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from moelens.analysis._kernels import jit, scatter_routing
from moelens.analysis.data import PHASES, Origin, RoutingData
from moelens.errors import InputError, StoreCorruptError

#: Loaded runs kept in memory (each costs ~6 bytes per routing slot). The app re-asks for the same run on
#: every interaction, so even a small cache removes nearly all loads.
CACHE_SIZE = 2

#: Routing rows per Arrow batch: large enough to amortise numpy call overhead, small enough to bound memory.
BATCH_ROWS = 1 << 21

#: DuckDB buffer pool of the reading connection: scanned blocks are cached up to this, so it bounds the
#: reader's memory whatever the run's size. A stream reads each block once, so a larger pool caches nothing
#: useful; at 1 GB it filled up with a 1M-token run's blocks and added ~0.5 GB to every score's peak RSS.
READ_MEMORY_LIMIT = "256MB"

_cache: OrderedDict[tuple[Any, ...], RoutingData] = OrderedDict()
_cache_lock = threading.Lock()


def load_run(store: Any, run_id: int, *, phase: str | None = None) -> RoutingData:
    """`RoutingData` of one whole run (optionally one phase). Completed runs are immutable, so they are
    cached by (store path, run id, completion time); a run still recording is read afresh every time."""
    if phase is not None and phase not in PHASES:
        raise InputError(f"phase must be one of {PHASES} or None, not {phase!r}")
    key = run_key(store.run(int(run_id)), store.path)
    key = None if key is None else (*key, phase)
    with _cache_lock:
        if key is not None and key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    row = store.run(int(run_id))  # raises RunNotFoundError listing the ids that exist
    with store.connect() as con:
        reader = RangeReader(con, store, row, phase)
        data = reader.read(None, origin=True)
    if key is not None:
        with _cache_lock:
            _cache[key] = data
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return data


def clear_cache() -> None:
    """Forget every cached run and score result (tests; or to free memory)."""
    from moelens.analysis.chunked import clear_results

    with _cache_lock:
        _cache.clear()
    clear_results()


def run_key(row: dict[str, Any], path: Any) -> tuple[Any, ...] | None:
    """Identity of a finished run's contents (its ``runs`` row): (store path, run id, finished_at); None
    while it is recording or reads incomplete (a dataset shard missing: restoring it changes the contents),
    then nothing derived from it may be cached."""
    finished = row.get("finished_at")
    if row.get("status") in ("recording", "incomplete") or finished is None or pd.isna(finished):
        return None
    return (str(Path(path).resolve()), int(row["run_id"]), str(finished))


class _TokenIndex:
    """Maps ``(seq_id, pos)`` to the dense token index of the loaded data (-1 = not loaded).

    Sequences are sorted by id, each spanning ``largest stored pos + 1`` global slots from ``start``; a global
    slot maps to the kept token index (-1 for tokens of another phase or gaps). ``table`` maps
    ``seq_id - seq0`` to the sequence number; for sparse ids it is an identity over pre-mapped ids.
    """

    def __init__(self, seq_id: np.ndarray, pos: np.ndarray, keep: np.ndarray):
        self.seq_ids, sidx = np.unique(seq_id, return_inverse=True)
        self.length = np.zeros(len(self.seq_ids), np.int64)
        np.maximum.at(self.length, sidx, pos.astype(np.int64) + 1)
        self.start = np.r_[0, np.cumsum(self.length)[:-1]].astype(np.int64)
        glob = self.start[sidx] + pos
        present = np.zeros(int(self.length.sum()), bool)
        present[glob[keep]] = True
        self.slot = np.full(len(present), -1, np.int64)
        self.slot[present] = np.arange(int(present.sum()))
        self.n_tokens = int(present.sum())
        n = len(self.seq_ids)
        span = int(self.seq_ids[-1]) - int(self.seq_ids[0]) + 1 if n else 0
        self.dense = span <= 8 * n + 4096  # recorder ids are 0..N-1; anything else is mapped first
        self.seq0 = int(self.seq_ids[0]) if n and self.dense else 0
        self.table = np.full(span if self.dense else n, -1, np.int64)
        self.table[(self.seq_ids - self.seq0) if self.dense else np.arange(n)] = np.arange(n)

    def sequence(self, seq_id: np.ndarray) -> np.ndarray:
        """Sequence number of each id (-1 = unknown)."""
        if not len(self.seq_ids):
            return np.full(len(seq_id), -1, np.int64)
        idx = np.minimum(np.searchsorted(self.seq_ids, seq_id), len(self.seq_ids) - 1)
        return np.where(self.seq_ids[idx] == seq_id, idx, -1)

    def kernel_seq(self, seq_id: np.ndarray) -> np.ndarray:
        """``seq_id`` as the scatter kernel reads it (``table[id - seq0]``)."""
        return seq_id if self.dense else self.sequence(seq_id)

    def __call__(self, seq_id: np.ndarray, pos: np.ndarray) -> np.ndarray:
        sidx = self.sequence(seq_id)
        safe = np.maximum(sidx, 0)
        ok = (sidx >= 0) & (pos >= 0) & (pos < self.length[safe])
        return np.where(ok, self.slot[np.where(ok, self.start[safe] + pos, 0)], -1)


class RangeReader:
    """Reads runs' rows into `RoutingData` over one open connection: the whole run, or the sequences with
    ``lo <= seq_id <= hi``, with bounded SQL queries.

    Layer ids, E and k come from the ``layers`` table and label names from ``sequences`` of the whole run, so
    every batch of a run shares them and per-batch statistics line up.
    """

    def __init__(self, con: Any, store: Any, run_row: dict[str, Any], phase: str | None,
                 label_names: tuple[str, ...] | None = None):
        run_id = int(run_row["run_id"])
        self.con, self.store, self.run_id, self.phase = con, store, run_id, phase
        with contextlib.suppress(duckdb.Error):  # refused inside Jupyter kernels without ipywidgets
            con.execute("SET enable_progress_bar = false")
        with contextlib.suppress(duckdb.Error):
            con.execute(f"SET memory_limit = '{READ_MEMORY_LIMIT}'")
        self.layers = _layer_table(con, run_id, run_row)
        self.label_names = run_labels(con, run_id) if label_names is None else label_names
        #: sorted seq ids a range read keeps (None = every sequence of the range): a range can then span
        #: sequences a score does not need (another label's, SCH's unsampled ones) in one query, not one per gap
        self.only: np.ndarray | None = None

    def _where(self, lo: int | None, hi: int | None) -> tuple[str, list[Any]]:
        where, params = "run_id = ?", [self.run_id]
        if lo is not None:
            where, params = where + " AND seq_id BETWEEN ? AND ?", [*params, int(lo), int(hi)]  # type: ignore[arg-type]
            if self.only is not None:
                ids = self.only[np.searchsorted(self.only, lo) : np.searchsorted(self.only, hi, side="right")]
                where, params = where + " AND seq_id IN (SELECT unnest(?::BIGINT[]))", [*params, ids.tolist()]
        return where, params

    def fetch(self, sql: str, lo: int | None = None, hi: int | None = None, extra: str = "", *params: Any) -> pa.Table:
        """``SELECT ... FROM t WHERE {range}`` (``sql`` ends with the table name) as Arrow."""
        where, args = self._where(lo, hi)
        return self.con.sql(f"{sql} WHERE {where} {extra}", params=[*args, *params]).to_arrow_table()

    def sequence_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(seq_id, kept tokens) of every sequence with tokens (of the phase), by seq_id."""
        extra, params = ("AND phase = ?", [self.phase]) if self.phase else ("", [])
        rows = self.fetch("SELECT seq_id, count(*) AS n FROM tokens", None, None, f"{extra} GROUP BY seq_id ORDER BY seq_id", *params)
        return rows.column("seq_id").to_numpy().astype(np.int64), rows.column("n").to_numpy().astype(np.int64)

    def empty(self) -> RoutingData:
        """A `RoutingData` with the run's layers and labels and no token (the context of a streamed score)."""
        L, K = len(self.layers), int(self.layers["top_k"].max()) if len(self.layers) else 0
        z = np.zeros(0, np.int32)
        return RoutingData(
            experts=np.full((L, 0, K), -1, np.int16), weights=np.zeros((L, 0, K), np.float32),
            layer_ids=self.layers["layer"].to_numpy(np.int32), n_experts=self.layers["n_experts"].to_numpy(np.int32),
            top_k=self.layers["top_k"].to_numpy(np.int32), seq_id=z, pos=z, token_id=z, predicted_id=z,
            phase=np.zeros(0, np.int8), label=z, label_names=self.label_names, phase_filter=self.phase,
            origin=Origin(Path(self.store.path).resolve(), self.run_id, self.phase),
        ).freeze()  # fmt: skip

    def read(
        self, seq_range: tuple[int, int] | None, *, origin: bool = False, text: bool = False, logits_layer: int | None = None
    ) -> RoutingData:
        """The tokens of ``seq_range`` (None = the whole run) as `RoutingData`. With ``origin`` the data
        can fetch token text and logits of the whole run later; a batch instead loads ``text`` and the
        logits of ``logits_layer`` for its own range up front."""
        lo, hi = seq_range if seq_range is not None else (None, None)
        run_id, phase = self.run_id, self.phase
        toks = self.fetch("SELECT seq_id, pos, token_id, phase, predicted_id" + (", token" if text else "") + " FROM tokens", lo, hi)
        seqs = self.fetch("SELECT seq_id, label FROM sequences", lo, hi)
        phase_col = toks.column("phase")
        keep = np.ones(toks.num_rows, bool) if phase is None else _is(phase_col, phase)
        index = _TokenIndex(toks.column("seq_id").to_numpy(), toks.column("pos").to_numpy(), keep)
        T = index.n_tokens
        at = index(toks.column("seq_id").to_numpy(), toks.column("pos").to_numpy())[keep]

        def per_token(values: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
            out = np.full(T, fill, dtype)
            out[at] = values[keep]
            return out

        phase_codes = np.full(toks.num_rows, -1, np.int8)
        for code, name in enumerate(PHASES):
            phase_codes[_is(phase_col, name)] = code
        token_seq = per_token(toks.column("seq_id").to_numpy(), 0, np.int32)
        seq_label = _sequence_labels(seqs, index, self.label_names)
        sidx = index.sequence(token_seq)
        experts, weights = _scatter_routing(self, lo, hi, index, T)
        shared = _scatter_shared(self, lo, hi, index, T)
        data = RoutingData(  # frozen: the cache hands the same arrays to every caller
            experts=experts,
            weights=weights,
            layer_ids=self.layers["layer"].to_numpy(np.int32),
            n_experts=self.layers["n_experts"].to_numpy(np.int32),
            top_k=self.layers["top_k"].to_numpy(np.int32),
            seq_id=token_seq,
            pos=per_token(toks.column("pos").to_numpy(), 0, np.int32),
            token_id=per_token(toks.column("token_id").to_numpy(), -1, np.int32),
            predicted_id=per_token(pc.fill_null(toks.column("predicted_id"), -1).to_numpy(), -1, np.int32),
            phase=per_token(phase_codes, -1, np.int8),
            label=np.where(sidx >= 0, seq_label[np.maximum(sidx, 0)], -1).astype(np.int32),
            label_names=self.label_names,
            shared_gate=shared,
            phase_filter=phase,
            origin=Origin(Path(self.store.path).resolve(), run_id, phase) if origin else None,
        )
        if text:
            words = toks.column("token").to_numpy(zero_copy_only=False)
            fallback = toks.column("token_id").to_numpy().astype(str).astype(object)
            data._lazy["text"] = per_token(np.where(pd.notna(words), words, fallback), "", object)
        if logits_layer is not None:
            data._lazy["logits"] = {int(logits_layer): _range_logits(self, lo, hi, data, int(logits_layer))}
        return data.freeze()


def _is(column: pa.ChunkedArray, value: str) -> np.ndarray:
    return pc.fill_null(pc.equal(column, value), False).to_numpy(zero_copy_only=False)


def _layer_table(con: Any, run_id: int, run: dict[str, Any]) -> pd.DataFrame:
    """Layer ids with E and k: from the ``layers`` table, else the run row, else the routing itself."""
    layers = con.execute(
        "SELECT DISTINCT layer, n_experts, top_k FROM layers WHERE run_id = ? ORDER BY layer", [run_id]
    ).df()
    if layers.empty or layers[["n_experts", "top_k"]].isna().any().any():
        seen = con.execute(
            "SELECT layer, max(expert) + 1 AS max_e, max(rank) + 1 AS max_k FROM routing WHERE run_id = ? GROUP BY layer",
            [run_id],
        ).df()
        layers = seen.merge(layers, on="layer", how="outer").sort_values("layer")
        for col, fallback, seen_col in (("n_experts", run.get("n_experts"), "max_e"), ("top_k", run.get("top_k"), "max_k")):
            if col not in layers:
                layers[col] = np.nan
            if fallback is not None and not pd.isna(fallback):
                layers[col] = layers[col].fillna(fallback)
            layers[col] = layers[col].fillna(layers[seen_col])
    layers = layers.dropna(subset=["n_experts", "top_k"]).reset_index(drop=True)
    return layers[["layer", "n_experts", "top_k"]].astype(np.int64)


def _layer_slots(layers: pd.DataFrame) -> np.ndarray:
    """Lookup table: model layer id -> position in the arrays (-1 = not a listed layer)."""
    ids = layers["layer"].to_numpy()
    table = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, np.int64)
    table[ids] = np.arange(len(ids))
    return table


def _scatter_routing(reader: RangeReader, lo: int | None, hi: int | None, index: _TokenIndex, T: int) -> tuple[np.ndarray, np.ndarray]:
    layers = reader.layers
    L, K = len(layers), int(layers["top_k"].max()) if len(layers) else 0
    experts = np.full((L, T, K), -1, np.int16)
    weights = np.zeros((L, T, K), np.float32)
    layer_slot = _layer_slots(layers)
    where, params = reader._where(lo, hi)
    rows = reader.con.sql(f"SELECT seq_id, pos, layer, rank, expert, weight FROM routing WHERE {where}", params=params)
    scatter = jit(scatter_routing)
    bad = 0
    for batch in rows.to_arrow_reader(BATCH_ROWS):
        col = [batch.column(i).to_numpy(zero_copy_only=False) for i in range(6)]
        bad += scatter(
            experts.reshape(-1), weights.reshape(-1), index.kernel_seq(col[0]), *col[1:], index.seq0, index.table,
            index.start, index.length, index.slot, layer_slot, T, K,
        )  # fmt: skip
    if bad:
        raise StoreCorruptError(f"run {reader.run_id}: {bad} routing rows have a layer the layers table does not list or a rank >= top_k")
    for li, n_exp in enumerate(layers["n_experts"]):
        top = int(experts[li].max(initial=-1))
        if top >= n_exp:
            raise StoreCorruptError(f"layer {layers['layer'][li]}: expert id {top} >= n_experts {n_exp}")
    return experts, weights


def _scatter_shared(reader: RangeReader, lo: int | None, hi: int | None, index: _TokenIndex, T: int) -> np.ndarray | None:
    rows = reader.fetch("SELECT seq_id, pos, layer, gate FROM shared_experts", lo, hi)
    if rows.num_rows == 0:
        return None
    layers = reader.layers
    gate = np.full((len(layers), T), np.nan, np.float32)
    tok = index(rows.column("seq_id").to_numpy(), rows.column("pos").to_numpy())
    layer = rows.column("layer").to_numpy().astype(np.int64)
    table = _layer_slots(layers)
    li = np.where((layer >= 0) & (layer < len(table)), table[np.clip(layer, 0, max(len(table) - 1, 0))], -1)
    if np.any(li < 0):
        raise StoreCorruptError(f"run {reader.run_id}: shared-expert gates for layers the layers table does not list")
    ok = tok >= 0
    gate[li[ok], tok[ok]] = rows.column("gate").to_numpy(zero_copy_only=False)[ok]
    return gate


def _sequence_labels(seqs: pa.Table, index: _TokenIndex, names: tuple[str, ...]) -> np.ndarray:
    """The label code (index into the run's sorted ``names``; -1 = unlabelled) of each loaded sequence."""
    cat = pd.Categorical(seqs.column("label").to_pylist(), categories=list(names))
    codes = np.full(len(index.seq_ids), -1, np.int32)
    sidx = index.sequence(seqs.column("seq_id").to_numpy())
    ok = sidx >= 0
    codes[sidx[ok]] = cat.codes[ok]
    return codes


def _range_logits(reader: RangeReader, lo: int | None, hi: int | None, data: RoutingData, layer: int) -> np.ndarray | None:
    rows = reader.fetch("SELECT seq_id, pos, logits FROM router_logits", lo, hi, "AND layer = ? AND logits IS NOT NULL", layer)
    return _logit_matrix(rows, data, layer)


# -- optional per-token columns, fetched when a score needs them --------------------------------------


def _fetch(data: RoutingData, sql: str, *params: Any) -> pa.Table:
    """Rows of the run ``data`` was loaded from (``?`` placeholders after the leading run id)."""
    from moelens.store import TraceStore

    assert data.origin is not None
    with TraceStore(data.origin.path, read_only=True).connect() as con:
        return con.sql(sql, params=[data.origin.run_id, *params]).to_arrow_table()


def load_token_text(data: RoutingData) -> np.ndarray:
    """Per-token text of a loaded run (``str(token_id)`` where the store has none)."""
    rows = _fetch(data, "SELECT seq_id, pos, token FROM tokens WHERE run_id = ?")
    text = data.token_id.astype(str).astype(object)
    idx = data.index_of(rows.column("seq_id").to_numpy(), rows.column("pos").to_numpy())
    values = rows.column("token").to_numpy(zero_copy_only=False)
    ok = (idx >= 0) & pd.notna(values)
    text[idx[ok]] = values[ok]
    return text


def load_router_logits(data: RoutingData, layer: int) -> np.ndarray | None:
    """float32[T, E] router logits of one layer, NaN rows where a token has none; None if none recorded."""
    rows = _fetch(
        data, "SELECT seq_id, pos, logits FROM router_logits WHERE run_id = ? AND layer = ? AND logits IS NOT NULL", int(layer)
    )
    return _logit_matrix(rows, data, layer)


def _logit_matrix(rows: pa.Table, data: RoutingData, layer: int) -> np.ndarray | None:
    if rows.num_rows == 0:
        return None
    lists = rows.column("logits").combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    width = int(np.nanmax(lengths))
    if np.any(lengths != width):
        raise StoreCorruptError(f"router logits of layer {layer} have rows of different lengths")
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
    out = np.full((data.n_tokens, width), np.nan, np.float32)
    idx = data.index_of(rows.column("seq_id").to_numpy(), rows.column("pos").to_numpy())
    out[idx[idx >= 0]] = values[idx >= 0]
    return out


def run_labels(con: Any, run_id: int) -> tuple[str, ...]:
    """The run's label names, sorted: the label codes every batch of the run shares."""
    labels = con.execute("SELECT DISTINCT label FROM sequences WHERE run_id = ? AND label IS NOT NULL", [int(run_id)]).fetchall()
    return tuple(sorted(str(r[0]) for r in labels))
