"""2-D maps: experts placed by what they process, tokens placed by their router logits. [moelens]

Why: with L·E experts (16 × 64 = 1024 for OLMoE), tables stop being readable; a UMAP of (layer, expert)
profiles shows clusters of experts serving the same domain or vocabulary, across layers (peers.md §7.8).
umap-learn is imported inside the functions (it takes seconds to import and compiles on first use).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moelens.analysis._common import Source, group_expert_counts, resolve, result
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

PROFILES = ("label", "token")


def expert_profiles(data: RoutingData, profile: str = "label", n_features: int = 256) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per (layer, expert): keys (layer, expert, count, dominant_label, share[, dominant_token])
    and a profile matrix whose rows are distributions (all zero for an expert with no routed token).

    ``label``: the expert's label specialization spec(e, D) = n_{e,D}/N_D normalised over labels (so label
    sizes do not matter); ``token``: the share of the expert's tokens that are each of the ``n_features``
    most frequent input token ids. ``dominant_label``/``share`` always come from the label profile.
    [moelens]; the label profile is OLMoE's domain specialization normalised per expert."""
    if profile not in PROFILES:
        raise InputError(f"profile must be one of {PROFILES}, not {profile!r}")
    D = len(data.label_names)
    n_d = np.bincount(data.label[data.label >= 0], minlength=D)
    if profile == "token":
        ids, counts = np.unique(data.token_id[data.token_id >= 0], return_counts=True)
        top = ids[np.argsort(-counts, kind="stable")[:n_features]]
        feature = np.full(data.n_tokens, -1, np.int64)
        hit = np.isin(data.token_id, top)
        feature[hit] = np.searchsorted(np.sort(top), data.token_id[hit])
        text = data.token_text()
        first = {int(t): text[i] for t, i in zip(*np.unique(data.token_id, return_index=True))}
        top_text = np.array([first.get(int(t), str(t)) for t in np.sort(top)], dtype=object)
    keys, rows = [], []
    for li, layer in enumerate(data.layer_ids):
        E = int(data.n_experts[li])
        by_label = group_expert_counts(data.experts[li], E, data.label, D).T.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            spec = np.nan_to_num(by_label / n_d)
        label_dist = _rows_to_distributions(spec)
        count = group_expert_counts(data.experts[li], E)[0]
        key = pd.DataFrame(
            {"layer": int(layer), "expert": np.arange(E), "count": count,
             "dominant_label": np.array(data.label_names, dtype=object)[label_dist.argmax(axis=1)] if D else None,
             "share": label_dist.max(axis=1) if D else np.nan}
        )  # fmt: skip
        key.loc[label_dist.sum(axis=1) == 0, ["dominant_label", "share"]] = [None, np.nan]
        if profile == "token":
            tok = _rows_to_distributions(group_expert_counts(data.experts[li], E, feature, len(top)).T.astype(np.float64))
            key["dominant_token"] = np.where(tok.sum(axis=1) > 0, top_text[tok.argmax(axis=1)] if len(top) else None, None)
            rows.append(tok)
        else:
            rows.append(label_dist)
        keys.append(key)
    return pd.concat(keys, ignore_index=True), np.vstack(rows) if rows else np.zeros((0, 0))


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
    source: Source,
    run: int | None = None,
    *,
    profile: str = "label",
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    n_features: int = 256,
    phase: str | None = None,
) -> pd.DataFrame:
    """UMAP (Hellinger distance, seeded) of every (layer, expert)'s profile (`expert_profiles`): columns
    layer, expert, x, y, count, dominant_label, share [, dominant_token]. Experts with no routed token keep
    NaN coordinates. Label profiles need labelled sequences. [moelens] (peers.md §7.8; moe-vis' atlas is a
    static t-SNE)."""
    data = resolve(source, run, phase=phase)
    keys, matrix = expert_profiles(data, profile, n_features)
    if profile == "label" and not data.label_names:
        raise InputError("profile='label' needs labelled sequences; use profile='token'")
    used = matrix.sum(axis=1) > 0
    xy = np.full((len(keys), 2), np.nan)
    xy[used] = _umap(matrix[used], seed, "hellinger", n_neighbors, min_dist)
    keys.insert(2, "x", xy[:, 0])
    keys.insert(3, "y", xy[:, 1])
    return result(keys, data, "expert_map", profile=profile, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist,
                  n_features=n_features, metric="hellinger", reference="[moelens]; moe-vis expert atlas (t-SNE)")  # fmt: skip


def token_map(
    source: Source,
    run: int | None = None,
    *,
    layer: int,
    max_tokens: int = 5000,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    phase: str | None = None,
) -> pd.DataFrame:
    """UMAP (cosine, seeded) of router-logit vectors of up to ``max_tokens`` sampled tokens of one layer,
    centred per token (softmax ignores shifts): columns seq_id, pos, token_id, token, label, top1 (the
    recorded first choice), x, y. Needs logits recorded for that layer. [moelens]"""
    data = resolve(source, run, phase=phase)
    li = data.layer_index(layer)
    logits = data.router_logits(layer)
    if logits is None:
        raise InputError(f"no router logits recorded for layer {layer}; record the run with logits enabled")
    have = np.flatnonzero(~np.isnan(logits).any(axis=1))
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(have, size=min(max_tokens, len(have)), replace=False))
    z = logits[pick].astype(np.float64)
    xy = _umap(z - z.mean(axis=1, keepdims=True), seed, "cosine", n_neighbors, min_dist)
    names = np.array([*data.label_names, None], dtype=object)
    df = pd.DataFrame(
        {"seq_id": data.seq_id[pick], "pos": data.pos[pick], "token_id": data.token_id[pick],
         "token": data.token_text()[pick], "label": names[data.label[pick]], "top1": data.experts[li, pick, 0],
         "x": xy[:, 0], "y": xy[:, 1]}
    )  # fmt: skip
    return result(df, data, "token_map", layer=layer, max_tokens=max_tokens, n_sampled=len(pick), seed=seed,
                  n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine (centred logits)", reference="[moelens]")  # fmt: skip
