"""2-D maps: experts placed by what they process, tokens placed by their router logits. [moelens]

Why: with L·E experts (16 × 64 = 1024 for OLMoE), tables stop being readable; a UMAP of (layer, expert)
profiles shows clusters of experts serving the same domain or vocabulary, across layers.
umap-learn is imported inside the functions (it takes seconds to import and compiles on first use).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import group_expert_counts, result
from moelens.analysis.chunked import Chunked, Context, Firsts, Keyed, Lowest, compute_partial, position_hash, position_order
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

PROFILES = ("label", "token")


@dataclass(frozen=True)
class TokenFrequency(Chunked):
    """Occurrences per input token id (a `Keyed`; grows with the vocabulary seen)."""

    def map(self, batch: RoutingData) -> Keyed:
        ids = batch.token_id[batch.token_id >= 0].astype(np.int64)
        return Keyed(ids, {"n": np.ones(len(ids), np.int64)}, {"n": "sum"})


@dataclass(frozen=True)
class ProfileCounts(Chunked):
    """Per layer ``[D, E]`` label × expert and ``[E]`` counts, ``[D]`` label tokens; with ``features``
    (token ids) also ``[F, E]`` feature × expert counts and each feature's first text."""

    features: tuple[int, ...] | None = None

    @property
    def text(self) -> bool:  # type: ignore[override]
        return self.features is not None

    def map(self, batch: RoutingData) -> dict[str, Any]:
        D = len(batch.label_names)
        out: dict[str, Any] = {
            "n_d": np.bincount(batch.label[batch.label >= 0], minlength=D),
            "by_label": [group_expert_counts(batch.experts[li], int(E), batch.label, D) for li, E in enumerate(batch.n_experts)],
            "count": [group_expert_counts(batch.experts[li], int(E))[0] for li, E in enumerate(batch.n_experts)],
        }
        if self.features is not None:
            top = np.sort(np.asarray(self.features, np.int64))
            feature = np.full(batch.n_tokens, -1, np.int64)
            hit = np.isin(batch.token_id, top)
            feature[hit] = np.searchsorted(top, batch.token_id[hit])
            out["features"] = [group_expert_counts(batch.experts[li], int(E), feature, len(top)) for li, E in enumerate(batch.n_experts)]
            ids, first = np.unique(batch.token_id[hit], return_index=True)
            rows = np.flatnonzero(hit)[first]
            names = batch.token_text()[rows]
            order = position_order(batch.seq_id[rows], batch.pos[rows])
            out["names"] = Firsts({int(i): [(int(o), t)] for i, o, t in zip(ids, order, names)}, 1)
        return out

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        """Label profiles are the run's label × expert counts: the ``expert_counts`` summary holds them."""
        if self.features is not None:
            return None
        from moelens.analysis.summary_partials import domain_counts

        counts = domain_counts(store, ctx, top1=False)
        return None if counts is None else {"n_d": counts["n_d"], "by_label": counts["by_label"], "count": counts["overall"]}


def expert_profiles(
    source: Any, run: int | None = None, profile: str = "label", n_features: int = 256, *, phase: str | None = None, **how: Any
) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per (layer, expert): keys (layer, expert, count, dominant_label, share[, dominant_token])
    and a profile matrix whose rows are distributions (all zero for an expert with no routed token).

    ``label``: the expert's label specialization spec(e, D) = n_{e,D}/N_D normalised over labels (so label
    sizes do not matter); ``token``: the share of the expert's tokens that are each of the ``n_features``
    most frequent input token ids (ties: lower id; a first pass counts the token ids, a second the
    profiles). ``dominant_label``/``share`` always come from the label profile.
    [moelens]; the label profile is OLMoE's domain specialization normalised per expert."""
    keys, matrix, _ = _profiles(source, run, profile, n_features, phase, how)
    return keys, matrix


def _profiles(source: Any, run: int | None, profile: str, n_features: int, phase: str | None, how: Any) -> tuple[pd.DataFrame, np.ndarray, RoutingData]:
    """`expert_profiles` and the run's token-free metadata."""
    if profile not in PROFILES:
        raise InputError(f"profile must be one of {PROFILES}, not {profile!r}")
    features = None
    if profile == "token":
        ids, freq = compute_partial(TokenFrequency(), source, run, phase=phase, **how)[0].table()
        features = tuple(int(t) for t in ids[np.argsort(-freq["n"], kind="stable")[:n_features]])
    partial, ctx = compute_partial(ProfileCounts(features), source, run, phase=phase, **how)
    data = ctx.meta
    D = len(data.label_names)
    n_d = partial["n_d"]
    if features is not None:
        top = np.sort(np.asarray(features, np.int64))
        names = partial["names"].items
        top_text = np.array([names[int(t)][0][1] if int(t) in names else str(t) for t in top], dtype=object)
    keys, rows = [], []
    for li, layer in enumerate(data.layer_ids):
        E = int(data.n_experts[li])
        by_label = partial["by_label"][li].T.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            spec = np.nan_to_num(by_label / n_d)
        label_dist = _rows_to_distributions(spec)
        key = pd.DataFrame(
            {"layer": int(layer), "expert": np.arange(E), "count": partial["count"][li],
             "dominant_label": np.array(data.label_names, dtype=object)[label_dist.argmax(axis=1)] if D else None,
             "share": label_dist.max(axis=1) if D else np.nan}
        )  # fmt: skip
        key.loc[label_dist.sum(axis=1) == 0, ["dominant_label", "share"]] = [None, np.nan]
        if features is not None:
            tok = _rows_to_distributions(partial["features"][li].T.astype(np.float64))
            key["dominant_token"] = np.where(tok.sum(axis=1) > 0, top_text[tok.argmax(axis=1)] if len(top) else None, None)
            rows.append(tok)
        else:
            rows.append(label_dist)
        keys.append(key)
    return pd.concat(keys, ignore_index=True), np.vstack(rows) if rows else np.zeros((0, 0)), data


def _rows_to_distributions(matrix: np.ndarray) -> np.ndarray:
    total = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, total, out=np.zeros_like(matrix), where=total > 0)


def _umap(points: np.ndarray, seed: int, metric: str, n_neighbors: int, min_dist: float) -> np.ndarray:
    """2-D UMAP embedding; neighbourhood shrunk for small inputs (needs at least 3 points)."""
    if len(points) < 3:
        raise InputError(f"a map needs at least 3 points with data, got {len(points)}")
    import umap  # slow import: only here

    n = min(n_neighbors, len(points) - 1)
    reducer = umap.UMAP(
        n_components=2, n_neighbors=n, min_dist=min_dist, metric=metric, random_state=seed, n_jobs=1,
        init="spectral" if len(points) > 2 * n + 2 else "random",
    )  # fmt: skip
    return reducer.fit_transform(points)


def expert_map(
    source: Any,
    run: int | None = None,
    *,
    profile: str = "label",
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    n_features: int = 256,
    phase: str | None = None,
    **how: Any,
) -> pd.DataFrame:
    """UMAP (Hellinger distance, seeded) of every (layer, expert)'s profile (`expert_profiles`): columns
    layer, expert, x, y, count, dominant_label, share [, dominant_token]. Experts with no routed token keep
    NaN coordinates. Label profiles need labelled sequences. The profiles are L·E rows whatever the run's
    size. [moelens] (thimbleberrysystems/moe-vis' "Expert Atlas" is a static t-SNE)."""
    keys, matrix, data = _profiles(source, run, profile, n_features, phase, how)
    if profile == "label" and not data.label_names:
        raise InputError("profile='label' needs labelled sequences; use profile='token'")
    used = matrix.sum(axis=1) > 0
    xy = np.full((len(keys), 2), np.nan)
    xy[used] = _umap(matrix[used], seed, "hellinger", n_neighbors, min_dist)
    keys.insert(2, "x", xy[:, 0])
    keys.insert(3, "y", xy[:, 1])
    return result(keys, data, "expert_map", profile=profile, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist,
                  n_features=n_features, metric="hellinger", reference="[moelens]; moe-vis expert atlas (t-SNE)")  # fmt: skip


@dataclass(frozen=True)
class LogitSample(Chunked):
    """The ``max_tokens`` tokens with router logits at ``layer`` whose seeded position hash is lowest (a
    `Lowest`: deterministic whatever the batch split), with their logits and descriptors."""

    layer: int = 0
    max_tokens: int = 5000
    seed: int = 0
    text: bool = True

    @property
    def logits_layer(self) -> int:  # type: ignore[override]
        return self.layer

    def map(self, batch: RoutingData) -> Lowest | None:
        li = batch.layer_index(self.layer)
        logits = batch.router_logits(self.layer)
        if logits is None:
            return None
        have = np.flatnonzero(~np.isnan(logits).any(axis=1))
        columns = {
            "logits": logits[have], "seq_id": batch.seq_id[have], "pos": batch.pos[have], "token_id": batch.token_id[have],
            "token": batch.token_text()[have], "label": batch.label[have], "top1": batch.experts[li, have, 0],
        }  # fmt: skip
        return Lowest(position_hash(batch.seq_id[have], batch.pos[have], self.seed), position_order(batch.seq_id[have], batch.pos[have]), columns, self.max_tokens)


def token_map(
    source: Any,
    run: int | None = None,
    *,
    layer: int,
    max_tokens: int = 5000,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    phase: str | None = None,
    **how: Any,
) -> pd.DataFrame:
    """UMAP (cosine, seeded) of router-logit vectors of up to ``max_tokens`` sampled tokens of one layer,
    centred per token (softmax ignores shifts): columns seq_id, pos, token_id, token, label, top1 (the
    recorded first choice), x, y. The sample is the tokens with the lowest hash of (seq_id, pos) seeded by
    ``seed``, so it does not depend on how the run is read; only the sample is held in memory. Needs logits
    recorded for that layer. [moelens]"""
    sample, ctx = compute_partial(LogitSample(int(layer), max_tokens, seed), source, run, phase=phase, **how)
    data = ctx.meta
    data.layer_index(layer)
    if sample is None or not len(sample.key):
        raise InputError(f"no router logits recorded for layer {layer}; record the run with logits enabled")
    order = np.lexsort((sample.columns["pos"], sample.columns["seq_id"]))
    cols = {k: v[order] for k, v in sample.columns.items()}
    z = cols["logits"].astype(np.float64)
    xy = _umap(z - z.mean(axis=1, keepdims=True), seed, "cosine", n_neighbors, min_dist)
    names = np.array([*data.label_names, None], dtype=object)
    df = pd.DataFrame(
        {"seq_id": cols["seq_id"], "pos": cols["pos"], "token_id": cols["token_id"], "token": cols["token"],
         "label": names[cols["label"]], "top1": cols["top1"], "x": xy[:, 0], "y": xy[:, 1]}
    )  # fmt: skip
    return result(df, data, "token_map", layer=layer, max_tokens=max_tokens, n_sampled=len(df), seed=seed,
                  n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine (centred logits)", reference="[moelens]")  # fmt: skip
