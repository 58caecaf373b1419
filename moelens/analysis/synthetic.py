"""Synthetic routing traces with the structure real MoE routing has, for tests, benchmarks and the app demo.

Why these ingredients: real routing is far from uniform (log-normal expert
popularity per layer), depends on the domain (a per-label tilt of the popularity), on the token (some
tokens always go to "their" expert), and persists along a sequence (consecutive tokens often share experts).
Every score then has something non-trivial to find, and the generator is fully vectorised so a 1M-token
16-layer trace takes seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moelens.analysis.data import PHASES, RoutingData

#: Distinct top-k draws per (layer, label) that tokens pick from.
_BANK = 4096


def synthetic(
    n_tokens: int,
    n_layers: int,
    n_experts: int,
    top_k: int,
    seed: int = 0,
    *,
    seq_len: int = 512,
    n_labels: int = 4,
    vocab_size: int = 4096,
    skew: float = 1.0,
    label_tilt: float = 1.0,
    token_affinity: float = 0.3,
    persistence: float = 0.2,
    generated_fraction: float = 0.0,
    drop_rate: float = 0.0,
    shared_expert: bool = False,
) -> RoutingData:
    """A reproducible synthetic run.

    ``skew`` is the σ of the log-normal expert popularity, ``label_tilt`` the σ of each label's extra
    log-popularity, ``token_affinity`` the chance a token's first choice is its token id's fixed expert,
    ``persistence`` the chance a token copies the previous token's experts, ``generated_fraction`` the tail
    of each sequence marked as generated, ``drop_rate`` the chance a slot is capacity-dropped (-1).
    Log-normal popularity as plumb-moe's generator.
    """
    rng = np.random.default_rng(seed)
    n_seq = max(1, -(-n_tokens // seq_len))
    seq_id = (np.arange(n_tokens) // seq_len).astype(np.int32)
    pos = (np.arange(n_tokens) % seq_len).astype(np.int32)
    seq_label = rng.integers(0, n_labels, n_seq)
    label = seq_label[seq_id]
    token_id = ((rng.zipf(1.3, n_tokens) - 1 + label * (vocab_size // max(n_labels, 1) // 3)) % vocab_size).astype(np.int32)
    seq_n = np.bincount(seq_id, minlength=n_seq)
    generated = pos >= np.ceil(seq_n[seq_id] * (1 - generated_fraction))
    next_id = np.r_[token_id[1:], 0]
    predicted = np.where(rng.random(n_tokens) < 0.5, next_id, rng.integers(0, vocab_size, n_tokens)).astype(np.int32)
    first = pos == 0
    src = np.maximum.accumulate(np.where(first | (rng.random(n_tokens) >= persistence), np.arange(n_tokens), 0))

    experts = np.empty((n_layers, n_tokens, top_k), np.int16)
    pick = rng.integers(0, _BANK, (n_layers, n_tokens))
    for li in range(n_layers):
        logits = rng.normal(0.0, skew, n_experts) + rng.normal(0.0, label_tilt, (n_labels, n_experts))
        # a bank of top-k draws without replacement per label (Gumbel top-k, in descending key order = rank
        # order); each token takes one of its label's: as exact in distribution as needed, and O(T·k)
        keys = logits[:, None, :] + rng.gumbel(size=(n_labels, _BANK, n_experts))
        bank = np.argsort(-keys, axis=-1)[..., :top_k]
        layer = bank[label, pick[li]]
        affine = np.flatnonzero(rng.random(n_tokens) < token_affinity)
        _put_first(layer, affine, (token_id[affine].astype(np.int64) * 2654435761 + li * 40503) % n_experts)
        experts[li] = layer[src]

    # geometric gates decay^r: descending in rank order by construction (no per-token sort needed)
    gates = rng.uniform(0.2, 0.95, (n_layers, n_tokens, 1)).astype(np.float32) ** np.arange(top_k, dtype=np.float32)
    weights = gates / gates.sum(axis=-1, keepdims=True)
    if drop_rate:
        weights[rng.random(weights.shape) < drop_rate] = 0.0
    names = [f"domain{i}" for i in range(n_labels)]
    return RoutingData.from_arrays(
        experts,
        weights,
        n_experts=n_experts,
        layer_ids=range(n_layers),
        seq_id=seq_id,
        pos=pos,
        token_id=token_id,
        predicted_id=predicted,
        phase=np.array(PHASES, dtype=object)[generated.astype(int)],
        labels=np.array(names, dtype=object)[label],
        token_text=np.char.add("t", token_id.astype(str)).astype(object),
        shared_gate=rng.uniform(0.0, 1.0, (n_layers, n_tokens)).astype(np.float32) if shared_expert else None,
    )


def _put_first(layer: np.ndarray, rows: np.ndarray, expert: np.ndarray) -> None:
    """In place: make ``expert`` the first choice of ``rows``, swapping it forward if the row already has
    it (experts stay distinct), else replacing the old first choice."""
    sub = layer[rows]
    match = sub == expert[:, None]
    at = match.argmax(axis=1)
    has = match.any(axis=1)
    old_first = sub[:, 0].copy()
    sub[np.arange(len(rows)), at] = np.where(has, old_first, sub[np.arange(len(rows)), at])
    sub[:, 0] = expert
    layer[rows] = sub


def write_run(store: Any, data: RoutingData, *, model: str = "synthetic", chunk_tokens: int = 1 << 16, **run_fields: Any) -> int:
    """Write a `RoutingData` into a `TraceStore` as a complete run (one append per token chunk) and
    return its run id. Not-routed slots below a layer's k are written as ``expert = -1, weight = 0``."""
    L = data.n_layers
    run_id = store.create_run(
        model,
        n_layers=L,
        moe_layers=data.layer_ids.tolist(),
        n_experts=int(data.n_experts.max(initial=0)),
        top_k=int(data.top_k.max(initial=0)),
        **run_fields,
    )
    seq_ids, starts, counts = np.unique(data.seq_id, return_index=True, return_counts=True)
    names = np.array([*data.label_names, None], dtype=object)
    prompt_len = np.add.reduceat((data.phase == 0).astype(np.int64), starts) if len(starts) else starts
    store.append(
        run_id,
        {
            "layers": {
                "layer": data.layer_ids,
                "block": data.layer_ids,
                "module": [f"layers.{i}.mlp" for i in data.layer_ids],
                "kind": ["moe"] * L,
                "n_experts": data.n_experts,
                "top_k": data.top_k,
                "has_shared_expert": [data.shared_gate is not None] * L,
            },
            "sequences": {
                "seq_id": seq_ids,
                "label": names[data.label[starts]],
                "source": ["synthetic"] * len(seq_ids),
                "prompt_len": prompt_len,
                "n_tokens": counts,
            },
        },
    )
    text = data.token_text()
    for a in range(0, data.n_tokens, chunk_tokens):
        b = min(a + chunk_tokens, data.n_tokens)
        store.append(run_id, _chunk(data, text, a, b))
    store.finish_run(run_id)
    return run_id


def _chunk(data: RoutingData, text: np.ndarray, a: int, b: int) -> dict[str, dict[str, Any]]:
    """Tokens ``[a, b)`` as store rows: tokens, routing (every slot below each layer's k), shared gates."""
    L, K = data.n_layers, data.k_max
    n = b - a
    li, t, r = np.meshgrid(np.arange(L), np.arange(a, b), np.arange(K), indexing="ij")
    in_k = r < data.top_k[li]
    phase = np.array([*PHASES, None], dtype=object)
    tables: dict[str, dict[str, Any]] = {
        "tokens": {
            "seq_id": data.seq_id[a:b],
            "pos": data.pos[a:b],
            "token_id": data.token_id[a:b],
            "token": text[a:b],
            "phase": phase[data.phase[a:b]],
            "predicted_id": np.where(data.predicted_id[a:b] >= 0, data.predicted_id[a:b], None),
        },
        "routing": {
            "seq_id": data.seq_id[t[in_k]],
            "pos": data.pos[t[in_k]],
            "layer": data.layer_ids[li[in_k]],
            "rank": r[in_k],
            "expert": data.experts[:, a:b][in_k],
            "weight": data.weights[:, a:b][in_k],
        },
    }
    if data.shared_gate is not None:
        tables["shared_experts"] = {
            "seq_id": np.tile(data.seq_id[a:b], L),
            "pos": np.tile(data.pos[a:b], L),
            "layer": np.repeat(data.layer_ids, n),
            "gate": data.shared_gate[:, a:b].ravel(),
        }
    return tables


def write_parquet_run(folder: Any, data: RoutingData, *, run_id: int = 1, n_shards: int = 2, model: str = "synthetic") -> Path:
    """Write a `RoutingData` as one complete run ``run_id`` of a partitioned Parquet dataset at ``folder``, split
    into ``n_shards`` shards of whole sequences (for tests and benchmarks of the distributed engine): written to a
    scratch DuckDB file by `write_run`, then exported with the store's own `export_parquet`."""
    import tempfile

    from moelens.store import TraceStore

    with tempfile.TemporaryDirectory() as scratch:
        source = TraceStore(Path(scratch) / "scratch.duckdb")
        for _ in range(run_id - 1):  # run ids count from 1: place this run at ``run_id``
            source.finish_run(source.create_run(model), "failed", error="placeholder")
        run = write_run(source, data, model=model)
        source.export_parquet(run, folder, shards=n_shards)
    return Path(folder)
