"""Cached, read-only access to the trace store (a DuckDB file or a Parquet dataset) for the app.

Public functions take ``(db, stamp, run, ...)``. ``stamp`` changes whenever the store changes on disk; it only
decides when to look the run up again (`run_key`: one tiny query). What is cached *per run* is keyed by
``store.run_version(run)`` — (store, run, completion time, status) — plus the run's derived summaries: a
completed run is immutable, so recording another run into the same store keeps every cached result of this one,
while a run still recording is re-read as its rows arrive.
Connections are short-lived (`TraceStore` opens one per query), so the app never blocks a recorder for long.

The analyses are *called*, never re-implemented: `analysis(db, "expert_load", run, by_label=True)` calls
``moelens.analysis.expert_load(store, run, by_label=True)`` and caches the DataFrame. The count-based analyses
finish from the run's derived summaries (`moelens.analysis.summarize`) when it has them, so such a page reads
thousands of rows instead of the routing (hundreds of millions on a real model); two Experts-page analyses that
have no summary-based finish are answered by bounded reads (`workbench.bounded`).

A page never starts a long pass by itself: every result goes through `within_budget`, which answers when the
summaries, bounded reads or a pass of at most `pass_slots` routing slots can, and otherwise raises `PassNeeded`;
the page (`ui.offer_pass`) then offers it behind a Compute button and keeps what `run_pass` computes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import streamlit as st

from moelens.errors import MoelensError
from moelens.store import TraceStore
from workbench import bounded

if TYPE_CHECKING:
    from moelens.analysis import RoutingData

#: How long the app waits for a recorder's write lock before saying so (the recorder's chunks are short).
LOCK_TIMEOUT_S = 5.0


class AnalysisUnavailable(RuntimeError):
    """The installed moelens has no such analysis function (yet)."""


def stamp(db: str | Path) -> float:
    """A value that changes whenever the store changes: newest mtime/size of the file and its WAL (of a
    dataset: of its folders down to the shards, whose mtimes move when a part or marker lands)."""
    p = Path(db)
    paths = [p, p.with_name(p.name + ".wal")]
    if p.is_dir():
        paths = [p, *p.glob("*"), *p.glob("*/run_id=*"), *p.glob("*/run_id=*/*")]
    vals = []
    for q in paths:
        try:
            s = q.stat()
            vals.append(s.st_mtime_ns / 1e9 + s.st_size * 1e-12)
        except OSError:
            pass
    return max(vals) + len(vals) * 1e-15 if vals else 0.0


@st.cache_data(show_spinner=False, max_entries=1024)
def run_key(db: str, stamp: float, run: int) -> tuple:
    """The cache key of everything derived from ``run``: its `run_version` and materialised summary names."""
    with batch(db) as store:
        return store.run_version(int(run)), tuple(sorted(store.summary_names(int(run))))


_checked: dict[tuple[str, float], TraceStore] = {}
_checked_lock = threading.Lock()


def open_store(db: str | Path) -> TraceStore:
    """A read-only store for ``db``; the schema check runs once per file version, not on every query."""
    key = (str(db), stamp(db))
    with _checked_lock:
        store = _checked.get(key)
    if store is None:
        store = TraceStore(db, read_only=True, lock_timeout=LOCK_TIMEOUT_S)
        with _checked_lock:
            _checked.clear()  # only the newest version of each file matters; keep the dict tiny
            _checked[key] = store
    return store


@contextlib.contextmanager
def batch(db: str | Path) -> Iterator[TraceStore]:
    """``with batch(db) as store:`` — every query inside shares one read-only connection."""
    with open_store(db).session() as store:
        yield store


# -- raw rows (browsing, not metrics) ------------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=32)
def store_bundle(db: str, stamp: float) -> dict[str, Any]:
    """Everything the run picker and the Runs page need about the whole store, in one connection."""
    with batch(db) as store:
        meta = store.query("SELECT key, value FROM meta")
        counts = store.query(
            "SELECT (SELECT count(*) FROM runs) AS runs, (SELECT count(*) FROM tokens) AS tokens, "
            "(SELECT count(*) FROM sequences) AS sequences"
        ).iloc[0]
        runs_df = store.runs()
    p = Path(db)
    size = sum(f.stat().st_size for f in p.rglob("*.parquet")) if p.is_dir() else p.stat().st_size if p.exists() else 0
    return {
        "runs_df": runs_df,
        "meta": dict(zip(meta["key"], meta["value"])),
        "runs": int(counts["runs"]),
        "tokens": int(counts["tokens"]),
        "sequences": int(counts["sequences"]),
        "size_bytes": size,
    }


def store_overview(db: str, stamp: float) -> dict[str, Any]:
    return store_bundle(db, stamp)


def runs(db: str, stamp: float) -> pd.DataFrame:
    return store_bundle(db, stamp)["runs_df"]


def run_bundle(db: str, stamp: float, run: int) -> dict[str, Any]:
    """One run's row, layers, sequences and experts per layer, in one connection."""
    return _run_bundle(db, run_key(db, stamp, run), int(run))


@st.cache_data(show_spinner=False, max_entries=128)
def _run_bundle(db: str, key: tuple, run: int) -> dict[str, Any]:
    with batch(db) as store:
        info = store.run(run)
        lay = store.layers(run)
        if lay.empty:  # a run whose layers table was not written: the layers its routing has
            lay = store.query("SELECT DISTINCT layer FROM routing WHERE run_id = ? ORDER BY layer", [int(run)])
        seqs = store.sequences(run)
        n = int(info.get("n_experts") or 0)
        if "n_experts" in lay.columns and len(lay):
            per = {int(r.layer): int(r.n_experts) if pd.notna(r.n_experts) else n for r in lay.itertuples()}
        else:
            got = store.query(
                "SELECT layer, max(expert) + 1 AS n FROM routing WHERE run_id = ? GROUP BY layer ORDER BY layer", [int(run)]
            )
            per = {int(r.layer): max(n, int(r.n)) for r in got.itertuples()}
    return {"info": info, "layers": lay, "sequences": seqs, "experts": per}


def run_info(db: str, stamp: float, run: int) -> dict[str, Any]:
    return run_bundle(db, stamp, run)["info"]


def layers(db: str, stamp: float, run: int) -> pd.DataFrame:
    return run_bundle(db, stamp, run)["layers"]


def sequences(db: str, stamp: float, run: int) -> pd.DataFrame:
    return run_bundle(db, stamp, run)["sequences"]


def experts_of(db: str, stamp: float, run: int) -> dict[int, int]:
    """Number of routed experts per layer ({layer: n_experts})."""
    return run_bundle(db, stamp, run)["experts"]


def sequence_tokens(db: str, stamp: float, run: int, seq_id: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tokens of one sequence and their stored routing rows (as recorded, every layer): a bounded read."""
    return _sequence_tokens(db, run_key(db, stamp, run), int(run), int(seq_id))


@st.cache_data(show_spinner=False, max_entries=256)
def _sequence_tokens(db: str, key: tuple, run: int, seq_id: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    with batch(db) as store:
        toks = store.tokens(run, seq_id)
        routing = store.query(
            "SELECT seq_id, pos, layer, rank, expert, weight FROM routing WHERE run_id = ? AND seq_id = ? "
            "ORDER BY pos, layer, rank",
            [int(run), int(seq_id)],
        )
    if "seq_id" not in toks.columns:
        toks.insert(0, "seq_id", int(seq_id))
    return toks, routing


def token_ids_for(db: str, stamp: float, run: int, texts: tuple[str, ...]) -> pd.DataFrame:
    """The token ids whose exact text is one of ``texts`` in this run, with how often each occurs."""
    return _token_ids_for(db, run_key(db, stamp, run), int(run), tuple(texts))


@st.cache_data(show_spinner=False, max_entries=128)
def _token_ids_for(db: str, key: tuple, run: int, texts: tuple[str, ...]) -> pd.DataFrame:
    if not texts:
        return pd.DataFrame(columns=["token", "token_id", "occurrences"])
    marks = ", ".join("?" for _ in texts)
    with batch(db) as store:
        return store.query(
            f"SELECT token, token_id, count(*) AS occurrences FROM tokens WHERE run_id = ? AND token IN ({marks}) "
            "GROUP BY token, token_id ORDER BY occurrences DESC",
            [int(run), *texts],
        )


# -- analyses ------------------------------------------------------------------------------------------


def analysis_available(name: str) -> bool:
    try:
        mod = importlib.import_module("moelens.analysis")
    except Exception:
        return False
    return callable(getattr(mod, name, None))


def _function(name: str):
    try:
        mod = importlib.import_module("moelens.analysis")
    except ImportError as exc:
        raise AnalysisUnavailable(f"moelens.analysis could not be imported ({exc})") from exc
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise AnalysisUnavailable(f"moelens.analysis.{name} is not available in this install")
    return fn


@st.cache_data(show_spinner=False, max_entries=512)
def _analysis(db: str, key: tuple, name: str, run: int, params: tuple, _budget: int | None = None) -> Any:
    quick = bounded.shortcut(name, dict(params))
    with batch(db) as store:
        frame = quick(store, int(run)) if quick is not None else None
        return frame if frame is not None else _function(name)(store, int(run), **dict(params), **_how(name, _budget))


@st.cache_data(show_spinner=False, max_entries=128)
def _analysis_pair(db: str, keys: tuple, name: str, run_a: int, run_b: int, params: tuple, _budget: int | None = None) -> Any:
    fn = _function(name)
    with batch(db) as store:
        return fn(store, int(run_a), int(run_b), **dict(params), **_how(name, _budget))


def _freeze(params: dict[str, Any]) -> tuple:
    out = []
    for k, v in sorted(params.items()):
        if isinstance(v, list):
            v = tuple(v)
        out.append((k, v))
    return tuple(out)


def analysis(db: str, name: str, run: int, **params: Any) -> Any:
    """``moelens.analysis.<name>(store, run, **params)`` (or the same frame from bounded reads), cached by
    (db, run version, summaries, params). A result that needs a pass over more than `pass_slots` routing slots
    raises `PassNeeded` (whose ``run`` computes it) instead of starting that pass."""
    fn = _function(name)  # raise AnalysisUnavailable before touching the cache
    db, run = str(db), int(run)
    key, frozen = run_key(db, stamp(db), run), _freeze(params)

    def full(progress: Progress) -> Any:
        with batch(db) as store:
            return fn(store, run, **params, **_how(name, None, progress))

    size = None if takes_how(name) or bounded.shortcut(name, params) else run_size(db, run)
    what = f"`{name}`" if params.get("only_label") is None else f"`{name}` on label {params['only_label']!r}"
    return within_budget(("analysis", db, key, name, run, frozen), what,
                         lambda budget: _analysis(db, key, name, run, frozen, _budget=budget), full, size)


def analysis_pair(db: str, name: str, run_a: int, run_b: int, **params: Any) -> Any:
    """``moelens.analysis.<name>(store, run_a, run_b, **params)`` (e.g. ``run_agreement``), cached; a long pass
    raises `PassNeeded` as in `analysis`."""
    fn = _function(name)
    db, now = str(db), stamp(db)
    keys, frozen = (run_key(db, now, int(run_a)), run_key(db, now, int(run_b))), _freeze(params)

    def full(progress: Progress) -> Any:
        with batch(db) as store:
            return fn(store, int(run_a), int(run_b), **params, **_how(name, None, progress))

    return within_budget(("pair", db, keys, name, int(run_a), int(run_b), frozen), f"`{name}` of runs #{run_a} and #{run_b}",
                         lambda budget: _analysis_pair(db, keys, name, int(run_a), int(run_b), frozen, _budget=budget), full)


# -- passes over a whole run: within a budget at once, else on request -------------------------------------

#: ``progress(done, total)``, called after each batch of a pass.
Progress = Callable[[int, int], None]

#: The environment variable that sets `pass_slots` (an integer; ``none`` = no limit).
PASS_SLOTS_ENV = "MOELENS_PASS_SLOTS"
#: Routing slots (tokens × layers × top-k) a page reads on its own before it asks for a click: half a streamed
#: batch (`moelens.analysis.stream.TARGET_SLOTS`), about a second for the counting scores. The heaviest per slot,
#: SCH on its sample of a 48-layer × top-8 run (~50k tokens, 19M slots, 14 s on 2 busy cores), stays over it;
#: every run of the demo store (~1M slots) is far under it.
DEFAULT_PASS_SLOTS = 1 << 24


def pass_slots() -> int | None:
    """The pass budget: ``$MOELENS_PASS_SLOTS`` when set (``none``: no limit), else `DEFAULT_PASS_SLOTS`."""
    raw = os.environ.get(PASS_SLOTS_ENV, "").strip().lower()
    if raw in ("none", "off", "unlimited"):
        return None
    try:
        return int(raw) if raw else DEFAULT_PASS_SLOTS
    except ValueError:
        return DEFAULT_PASS_SLOTS


class PassNeeded(Exception):
    """A result that needs a pass over a run larger than `pass_slots`: what it is, how big, and ``run(progress)``
    that computes it (then kept like any cached result, see `run_pass`)."""

    def __init__(self, ident: tuple, what: str, n_tokens: int, n_batches: int, run: Callable[[Progress], Any]):
        self.ident, self.what, self.n_tokens, self.n_batches, self.run = ident, what, n_tokens, n_batches, run
        super().__init__(f"{what} needs a pass over {n_tokens:,} tokens of this run (≈ {n_batches:,} batches)")

    @property
    def key(self) -> str:
        """A short stable id of this result, for widget keys."""
        return hashlib.sha1(repr(self.ident).encode()).hexdigest()[:12]


def within_budget(ident: tuple, what: str, quick: Callable[[int | None], Any], full: Callable[[Progress], Any],
                  size: tuple[int, int] | None = None) -> Any:
    """The result ``ident``: kept from an earlier `run_pass`, else ``quick(budget)`` — which either answers (from
    summaries, bounded reads or a pass within the budget) or raises `NeedsFullPass` — unless ``size`` = (tokens,
    routing slots) the result must read is known to exceed the budget. Over the budget: `PassNeeded` with ``full``."""
    from moelens.analysis.chunked import NeedsFullPass
    from moelens.analysis.stream import TARGET_SLOTS

    with contextlib.suppress(LookupError):
        return _kept(ident)
    budget = pass_slots()
    if size is not None and budget is not None and size[1] > budget:
        raise PassNeeded(ident, what, size[0], -(-size[1] // TARGET_SLOTS), full)
    try:
        return quick(budget)
    except NeedsFullPass as exc:
        raise PassNeeded(ident, what, exc.n_tokens, exc.n_batches, full) from None


def run_pass(needed: PassNeeded, progress: Progress) -> Any:
    """Compute what ``needed`` stands for (``progress`` after each batch) and keep it, so every later render
    shows it without a click."""
    value = needed.run(progress)
    _kept(needed.ident, _value=value)
    return value


@st.cache_data(show_spinner=False, max_entries=512)
def _kept(ident: tuple, _value: Any = None) -> Any:
    """Results of passes run on request, cached like every other result (by run version): called with the
    value it stores it, without one it returns the stored value or raises LookupError (which is not cached)."""
    if _value is None:
        raise LookupError(ident)
    return _value


def takes_how(name: str) -> bool:
    """Whether ``moelens.analysis.<name>`` accepts the pass options (``progress``, ``max_pass_slots``)."""
    from moelens.analysis.registry import takes_how as accepts

    return accepts(_function(name))


def _how(name: str, budget: int | None, progress: Progress | None = None) -> dict[str, Any]:
    if not takes_how(name):
        return {}
    return {k: v for k, v in (("max_pass_slots", budget), ("progress", progress)) if v is not None}


def run_size(db: str, run: int, n_tokens: int | None = None) -> tuple[int, int]:
    """(tokens, routing slots) of a pass over ``run`` (or over ``n_tokens`` of its tokens): tokens × layers × top-k."""
    bundle = run_bundle(db, stamp(db), int(run))
    lay, info = bundle["layers"], bundle["info"]
    k = int(lay["top_k"].max()) if "top_k" in lay.columns and lay["top_k"].notna().any() else int(info.get("top_k") or 1)
    if n_tokens is None:
        n_tokens = info.get("n_tokens")
        if n_tokens is None or pd.isna(n_tokens):
            n_tokens = bundle["sequences"]["n_tokens"].fillna(0).sum() if "n_tokens" in bundle["sequences"] else 0
    tokens = int(n_tokens)
    return tokens, tokens * max(len(lay), 1) * k


#: Tokens per batch of the streamed run-vs-run passes (~40 MB of dense routing per run at 48 layers × top-8).
PASS_TOKENS = 1 << 14


def _read_range(store: TraceStore, run: int, lo: int, hi: int) -> RoutingData:
    """The sequences ``lo..hi`` of a run as a small `RoutingData` (bounded reads: seq_id-range filters)."""
    import numpy as np

    from moelens.analysis import RoutingData

    lay = bounded.run_layers(store, run)
    toks = store.arrow("SELECT seq_id, pos, token_id FROM tokens WHERE run_id = ? AND seq_id BETWEEN ? AND ? "
                       "ORDER BY seq_id, pos", [int(run), int(lo), int(hi)])
    rows = store.arrow("SELECT seq_id, pos, layer, rank, expert, weight FROM routing WHERE run_id = ? "
                       "AND seq_id BETWEEN ? AND ?", [int(run), int(lo), int(hi)])
    seq, pos = toks.column("seq_id").to_numpy(), toks.column("pos").to_numpy()
    col = {c: rows.column(c).to_numpy(zero_copy_only=False) for c in rows.column_names}
    key_t = seq.astype(np.int64) << 32 | pos
    key_r = col["seq_id"].astype(np.int64) << 32 | col["pos"]
    T, K = len(seq), int(lay["top_k"].max()) if len(lay) else 1
    t = np.minimum(np.searchsorted(key_t, key_r), max(T - 1, 0))
    slot = np.full(int(lay["layer"].max()) + 1 if len(lay) else 0, -1)
    slot[lay["layer"].to_numpy()] = np.arange(len(lay))
    layer = col["layer"].astype(np.int64)
    li = np.where((layer >= 0) & (layer < len(slot)), slot[np.clip(layer, 0, max(len(slot) - 1, 0))], -1)
    ok = (T > 0) & (key_t[t] == key_r) & (li >= 0) & (col["rank"] < K) if T else np.zeros(len(key_r), bool)
    experts = np.full((len(lay), T, K), -1, np.int16)
    weights = np.zeros((len(lay), T, K), np.float32)
    experts[li[ok], t[ok], col["rank"][ok]] = col["expert"][ok]
    weights[li[ok], t[ok], col["rank"][ok]] = col["weight"][ok]
    return RoutingData.from_arrays(experts, weights, n_experts=lay["n_experts"].tolist(), layer_ids=lay["layer"].tolist(),
                                   top_k=lay["top_k"].tolist(), seq_id=seq, pos=pos, token_id=toks.column("token_id").to_numpy())


def _agreement_per(a: RoutingData, b: RoutingData, key: str, values: Iterable[Any]) -> pd.DataFrame:
    """``run_agreement`` of ``a`` and ``b`` restricted to each value of their ``key`` field (``seq_id``,
    ``pos``) in turn, ``key`` as the first column; values where the runs share no token are left out.
    ``a`` and ``b`` are one bounded batch, so the per-value selections stay cheap."""
    from moelens.analysis import run_agreement

    frames = []
    for v in values:
        part = run_agreement(a.select(getattr(a, key) == v), None, b.select(getattr(b, key) == v))
        if len(part):
            part.insert(0, key, int(v))
            frames.append(part)
    return pd.concat(frames, ignore_index=True) if frames else _no_agreement(key)


def _no_agreement(key: str) -> pd.DataFrame:
    return pd.DataFrame(columns=[key, "layer", "n_tokens", "top1_agreement", "topk_overlap", "k", "baseline"])


@st.cache_data(show_spinner=False, max_entries=4096)
def _agreement_batch(db: str, keys: tuple, run_a: int, run_b: int, seq_ids: tuple[int, ...]) -> pd.DataFrame:
    with batch(db) as store:
        a = _read_range(store, run_a, seq_ids[0], seq_ids[-1])
        b = _read_range(store, run_b, seq_ids[0], seq_ids[-1])
    return _agreement_per(a, b, "seq_id", seq_ids)


def sequence_agreement(db: str, stamp: float, run_a: int, run_b: int) -> pd.DataFrame:
    """``moelens.analysis.run_agreement`` of two runs restricted to each shared sequence in turn: one row per
    (seq_id, layer), so the sequences whose routing changed most can be ranked. One streamed pass over both
    runs in batches of whole sequences (bounded memory; analysis code does the scoring); over `pass_slots`
    it raises `PassNeeded` (each batch is cached, so a stopped pass resumes where it stopped)."""
    import numpy as np

    keys = (run_key(db, stamp, run_a), run_key(db, stamp, run_b))
    seqs_a, seqs_b = sequences(db, stamp, run_a), sequences(db, stamp, run_b)
    common = np.intersect1d(seqs_a["seq_id"].to_numpy(), seqs_b["seq_id"].to_numpy())
    sizes = seqs_a.set_index("seq_id")["n_tokens"].reindex(common).fillna(1).to_numpy()
    group = (np.cumsum(sizes) - sizes) // PASS_TOKENS
    batches = [tuple(int(v) for v in common[group == g]) for g in np.unique(group)]

    def full(progress: Progress) -> pd.DataFrame:
        parts = []
        for i, ids in enumerate(batches, 1):
            parts.append(_agreement_batch(db, keys, int(run_a), int(run_b), ids))
            progress(i, len(batches))
        parts = [p for p in parts if len(p)]
        return pd.concat(parts, ignore_index=True) if parts else _no_agreement("seq_id")

    tokens = int(sizes.sum())
    slots = run_size(db, run_a, tokens)[1] + run_size(db, run_b, tokens)[1]  # both runs are read
    return within_budget(("sequence_agreement", db, keys), "Ranking the sequences by agreement", lambda _: full(lambda d, t: None),
                         full, (tokens, slots))


@st.cache_data(show_spinner=False, max_entries=64)
def _token_agreement(db: str, keys: tuple, run_a: int, run_b: int, seq_id: int, max_tokens: int) -> pd.DataFrame:
    import numpy as np

    with batch(db) as store:
        a, b = _read_range(store, run_a, seq_id, seq_id), _read_range(store, run_b, seq_id, seq_id)
    return _agreement_per(a, b, "pos", np.intersect1d(a.pos, b.pos)[:max_tokens])


def token_agreement_in_sequence(db: str, stamp: float, run_a: int, run_b: int, seq_id: int, max_tokens: int = 1024) -> pd.DataFrame:
    """Per (pos, layer) of one shared sequence: ``run_agreement`` of the two runs restricted to that single
    token (``topk_overlap`` < 1 = its expert set changed). Reads only that sequence of each run."""
    keys = (run_key(db, stamp, run_a), run_key(db, stamp, run_b))
    return _token_agreement(db, keys, int(run_a), int(run_b), int(seq_id), int(max_tokens))


#: (kind, db, stamp, run, params) of slow results computed in this process (e.g. UMAP maps), so pages can
#: show them at once on later visits instead of asking for a click.
_COMPUTED: set[tuple] = set()


def mark_computed(key: tuple) -> None:
    _COMPUTED.add(key)


def was_computed(key: tuple) -> bool:
    return key in _COMPUTED


class Timer:
    """Small helper for the timing caption: ``with Timer() as t: ...; t.ms``."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ms = (time.perf_counter() - self.t0) * 1000


__all__ = [
    "AnalysisUnavailable",
    "MoelensError",
    "PassNeeded",
    "analysis",
    "analysis_available",
    "analysis_pair",
    "experts_of",
    "layers",
    "open_store",
    "pass_slots",
    "run_pass",
    "run_info",
    "runs",
    "sequence_tokens",
    "sequences",
    "stamp",
    "store_overview",
]
