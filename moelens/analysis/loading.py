"""Load one run of a `TraceStore` into a `RoutingData`, fast, and keep recent runs cached.

Why this shape: a run of 1M tokens × 16 layers × top-2 is 32M routing rows. Sorting them in SQL or looping
over them in Python takes minutes; instead the routing table is streamed as Arrow record batches (bounded
memory, no ORDER BY) and each batch is scattered straight into the dense ``[layer, token, rank]`` arrays at
``token index = sequence offset + pos``. Token and sequence tables are small (one row per token/sequence).
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

_cache: OrderedDict[tuple[Any, ...], RoutingData] = OrderedDict()
_cache_lock = threading.Lock()


def load_run(store: Any, run_id: int, *, phase: str | None = None) -> RoutingData:
    """`RoutingData` of one run (optionally one phase), from the cache if the file has not changed."""
    if phase is not None and phase not in PHASES:
        raise InputError(f"phase must be one of {PHASES} or None, not {phase!r}")
    key = (*_file_state(store.path), int(run_id), phase)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    data = _read_run(store, int(run_id), phase)
    with _cache_lock:
        _cache[key] = data
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return data


def clear_cache() -> None:
    """Forget every cached run (tests; or to free memory)."""
    with _cache_lock:
        _cache.clear()


def _file_state(path: Path) -> tuple[Any, ...]:
    """Identity of the store's current contents: path plus size/mtime of the file and its write-ahead log."""
    resolved = path.resolve()
    state: list[Any] = [str(resolved)]
    for p in (resolved, resolved.with_name(resolved.name + ".wal")):
        st = p.stat() if p.exists() else None
        state.append(None if st is None else (st.st_mtime_ns, st.st_size))
    return tuple(state)


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


def _read_run(store: Any, run_id: int, phase: str | None) -> RoutingData:
    run = store.run(run_id)  # raises RunNotFoundError listing the ids that exist
    with store.connect() as con:
        with contextlib.suppress(duckdb.Error):  # refused inside Jupyter kernels without ipywidgets
            con.execute("SET enable_progress_bar = false")

        def fetch(sql: str, *params: Any) -> pa.Table:
            return con.sql(sql, params=[run_id, *params]).to_arrow_table()

        toks = fetch("SELECT seq_id, pos, token_id, phase, predicted_id FROM tokens WHERE run_id = ?")
        seqs = fetch("SELECT seq_id, label FROM sequences WHERE run_id = ?")
        layers = _layer_table(con, run_id, run)
        phase_col = toks.column("phase")
        keep = np.ones(toks.num_rows, bool) if phase is None else _is(phase_col, phase)
        index = _TokenIndex(toks.column("seq_id").to_numpy(), toks.column("pos").to_numpy(), keep)
        T = index.n_tokens
        rows = index(toks.column("seq_id").to_numpy(), toks.column("pos").to_numpy())
        at = rows[keep]

        def per_token(values: np.ndarray, fill: int, dtype: Any) -> np.ndarray:
            out = np.full(T, fill, dtype)
            out[at] = values[keep]
            return out

        phase_codes = np.full(toks.num_rows, -1, np.int8)
        for code, name in enumerate(PHASES):
            phase_codes[_is(phase_col, name)] = code
        token_seq = per_token(toks.column("seq_id").to_numpy(), 0, np.int32)
        label_names, seq_label = _sequence_labels(seqs, index)
        sidx = index.sequence(token_seq)
        experts, weights = _scatter_routing(con, run_id, index, layers, T)
        shared = _scatter_shared(con, run_id, index, layers, T)

    return RoutingData(  # frozen: the cache hands the same arrays to every caller
        experts=experts,
        weights=weights,
        layer_ids=layers["layer"].to_numpy(np.int32),
        n_experts=layers["n_experts"].to_numpy(np.int32),
        top_k=layers["top_k"].to_numpy(np.int32),
        seq_id=token_seq,
        pos=per_token(toks.column("pos").to_numpy(), 0, np.int32),
        token_id=per_token(toks.column("token_id").to_numpy(), -1, np.int32),
        predicted_id=per_token(pc.fill_null(toks.column("predicted_id"), -1).to_numpy(), -1, np.int32),
        phase=per_token(phase_codes, -1, np.int8),
        label=np.where(sidx >= 0, seq_label[np.maximum(sidx, 0)], -1).astype(np.int32),
        label_names=label_names,
        shared_gate=shared,
        phase_filter=phase,
        origin=Origin(store.path.resolve(), run_id, phase),
    ).freeze()


def _is(column: pa.ChunkedArray, value: str) -> np.ndarray:
    return pc.fill_null(pc.equal(column, value), False).to_numpy(zero_copy_only=False)


def _layer_table(con: Any, run_id: int, run: dict[str, Any]) -> pd.DataFrame:
    """Layer ids with E and k: from the ``layers`` table, else the run row, else the routing itself."""
    layers = con.execute(
        "SELECT layer, n_experts, top_k FROM layers WHERE run_id = ? ORDER BY layer", [run_id]
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


def _scatter_routing(con: Any, run_id: int, index: _TokenIndex, layers: pd.DataFrame, T: int) -> tuple[np.ndarray, np.ndarray]:
    L, K = len(layers), int(layers["top_k"].max()) if len(layers) else 0
    experts = np.full((L, T, K), -1, np.int16)
    weights = np.zeros((L, T, K), np.float32)
    layer_slot = _layer_slots(layers)
    reader = con.sql(
        "SELECT seq_id, pos, layer, rank, expert, weight FROM routing WHERE run_id = ?", params=[run_id]
    ).to_arrow_reader(BATCH_ROWS)
    scatter = jit(scatter_routing)
    bad = 0
    for batch in reader:
        col = [batch.column(i).to_numpy(zero_copy_only=False) for i in range(6)]
        bad += scatter(
            experts.reshape(-1), weights.reshape(-1), index.kernel_seq(col[0]), *col[1:], index.seq0, index.table,
            index.start, index.length, index.slot, layer_slot, T, K,
        )  # fmt: skip
    if bad:
        raise StoreCorruptError(f"run {run_id}: {bad} routing rows have a layer the layers table does not list or a rank >= top_k")
    for li, n_exp in enumerate(layers["n_experts"]):
        top = int(experts[li].max(initial=-1))
        if top >= n_exp:
            raise StoreCorruptError(f"layer {layers['layer'][li]}: expert id {top} >= n_experts {n_exp}")
    return experts, weights


def _scatter_shared(con: Any, run_id: int, index: _TokenIndex, layers: pd.DataFrame, T: int) -> np.ndarray | None:
    rows = con.sql("SELECT seq_id, pos, layer, gate FROM shared_experts WHERE run_id = ?", params=[run_id]).to_arrow_table()
    if rows.num_rows == 0:
        return None
    gate = np.full((len(layers), T), np.nan, np.float32)
    tok = index(rows.column("seq_id").to_numpy(), rows.column("pos").to_numpy())
    layer = rows.column("layer").to_numpy().astype(np.int64)
    table = _layer_slots(layers)
    li = np.where((layer >= 0) & (layer < len(table)), table[np.clip(layer, 0, max(len(table) - 1, 0))], -1)
    if np.any(li < 0):
        raise StoreCorruptError(f"run {run_id}: shared-expert gates for layers the layers table does not list")
    ok = tok >= 0
    gate[li[ok], tok[ok]] = rows.column("gate").to_numpy(zero_copy_only=False)[ok]
    return gate


def _sequence_labels(seqs: pa.Table, index: _TokenIndex) -> tuple[tuple[str, ...], np.ndarray]:
    """Label names (sorted) and the label code of each loaded sequence (-1 = unlabelled)."""
    cat = pd.Categorical(seqs.column("label").to_pylist())
    codes = np.full(len(index.seq_ids), -1, np.int32)
    sidx = index.sequence(seqs.column("seq_id").to_numpy())
    ok = sidx >= 0
    codes[sidx[ok]] = cat.codes[ok]
    return tuple(str(c) for c in cat.categories), codes


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
