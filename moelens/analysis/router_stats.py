"""Router internals from recorded router logits: how sure the router is, per token and per layer.

Per token and layer, on p = softmax(logits) over the layer's routed experts: the entropy H(p) (also divided by
ln E, 0 = one expert takes everything, 1 = uniform), the top-1/top-2 probability margin p(1) − p(2) and the
logit margin z(1) − z(2), and whether the token is a near-tie (probability margin below ``near_tie``): a token
whose first choice could flip under a tiny perturbation of its hidden state (router sensitivity as studied
for MoE routing fluctuation, e.g. StableMoE, arXiv:2204.08396; router confidence as in Switch Transformer,
arXiv:2101.03961). Softmax is the common read of the logits even for sigmoid routers (DeepSeek-V3): the margin
and ties are about the ranking, which both share.

The per-layer score is written as map → merge → finish, so it streams over batches of whole sequences in
bounded memory: `router_map` turns one batch into sums and histograms, `router_merge` adds two partials
exactly, `router_finish` turns the total into the per-layer table. `router_stats` streams a run through them
(`RouterCounts`), one pass per layer with logits, since a batch carries one layer's logits (E floats per
token: the largest thing a run stores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import Source, resolve, result
from moelens.analysis.chunked import Chunked, Context, compute, context
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

#: Histogram bins of normalised entropy and of the probability margin (both lie in [0, 1]).
N_BINS = 20
_REFERENCE = "softmax entropy and top-1/top-2 margin of router logits; StableMoE (arXiv:2204.08396), Switch (arXiv:2101.03961)"


def token_router_values(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of ``float[T, E]`` logits: ``entropy`` (nats), ``norm_entropy`` (÷ ln E), ``margin`` (p1 − p2)
    and ``logit_margin`` (z1 − z2). Rows holding a NaN give NaN."""
    z = np.asarray(logits, np.float64)
    E = z.shape[1]
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(np.where(p > 0, p * np.log(p), 0.0)).sum(axis=1)
    top2_p = -np.sort(-p, axis=1)[:, :2] if E >= 2 else np.c_[p, np.zeros(len(p))]
    top2_z = -np.sort(-z, axis=1)[:, :2] if E >= 2 else np.c_[z, np.full(len(z), np.nan)]
    bad = np.isnan(z).any(axis=1)
    out = {
        "entropy": entropy,
        "norm_entropy": entropy / np.log(E) if E > 1 else np.zeros(len(z)),
        "margin": top2_p[:, 0] - top2_p[:, 1],
        "logit_margin": top2_z[:, 0] - top2_z[:, 1],
    }
    return {k: np.where(bad, np.nan, v) for k, v in out.items()}


def _layers_with_logits(data: RoutingData) -> list[tuple[int, np.ndarray]]:
    found = [(int(layer), data.router_logits(int(layer))) for layer in data.layer_ids]
    return [(layer, lg) for layer, lg in found if lg is not None]


def router_map(data: RoutingData, *, near_tie: float = 0.02) -> dict[int, dict[str, Any]]:
    """Partial statistics of one batch: per layer, token count, sums of the four values, near-tie count and
    histograms of normalised entropy and margin."""
    return {layer: _layer_part(logits, near_tie) for layer, logits in _layers_with_logits(data)}


def _layer_part(logits: np.ndarray, near_tie: float) -> dict[str, Any]:
    """`router_map`'s partial of one layer's ``float[T, E]`` logits."""
    edges = np.linspace(0, 1, N_BINS + 1)
    v = token_router_values(logits)
    ok = ~np.isnan(v["entropy"])
    return {
        "n_experts": logits.shape[1],
        "n_tokens": int(ok.sum()),
        **{f"sum_{k}": float(v[k][ok].sum()) for k in v},
        "n_near_tie": int((v["margin"][ok] < near_tie).sum()),
        "hist_norm_entropy": np.histogram(np.clip(v["norm_entropy"][ok], 0, 1), edges)[0],
        "hist_margin": np.histogram(np.clip(v["margin"][ok], 0, 1), edges)[0],
    }


@dataclass(frozen=True)
class RouterCounts(Chunked):
    """`router_map`'s partial of one layer (``logits_layer``), streamed with that layer's logits."""

    logits_layer: int = 0
    near_tie: float = 0.02

    def map(self, batch: RoutingData) -> dict[int, dict[str, Any]]:
        logits = batch.router_logits(self.logits_layer) if batch.n_tokens else None
        return {} if logits is None else {self.logits_layer: _layer_part(logits, self.near_tie)}

    def merge(self, a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return router_merge(a, b)

    def finish(self, partial: dict[int, dict[str, Any]], ctx: Context) -> pd.DataFrame:
        return router_finish(partial)


def router_merge(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The exact sum of two partials (layers present in either)."""
    out = {layer: dict(p) for layer, p in a.items()}
    for layer, p in b.items():
        if layer not in out:
            out[layer] = dict(p)
            continue
        q = out[layer]
        for k, v in p.items():
            if k != "n_experts":
                q[k] = q[k] + v
    return out


def router_finish(part: dict[int, dict[str, Any]]) -> pd.DataFrame:
    """Per layer: ``n_tokens``, means of the four values, ``near_tie_share`` and the median normalised entropy
    and margin (from the histograms: the upper edge of the bin holding the middle token)."""
    edges = np.linspace(0, 1, N_BINS + 1)

    def median(hist: np.ndarray) -> float:
        total = hist.sum()
        return float(edges[1:][np.searchsorted(np.cumsum(hist), total / 2)]) if total else float("nan")

    rows = []
    for layer in sorted(part):
        p = part[layer]
        n = p["n_tokens"]
        mean = (lambda k: p[f"sum_{k}"] / n if n else float("nan"))  # noqa: E731
        rows.append({"layer": layer, "n_experts": p["n_experts"], "n_tokens": n, "entropy": mean("entropy"),
                     "norm_entropy": mean("norm_entropy"), "margin": mean("margin"),
                     "logit_margin": mean("logit_margin"), "near_tie_share": p["n_near_tie"] / n if n else float("nan"),
                     "median_norm_entropy": median(p["hist_norm_entropy"]), "median_margin": median(p["hist_margin"])})
    return pd.DataFrame(rows)


def router_stats(source: Source, run: int | None = None, *, near_tie: float = 0.02, phase: str | None = None,
                 **how: Any) -> pd.DataFrame:
    """Router confidence per layer from recorded logits: mean entropy (nats and ÷ ln E), mean top-1/top-2
    probability and logit margins, the share of near-ties (probability margin < ``near_tie``) and the medians.
    Needs a run recorded with router logits. Streamed: one pass per layer with logits."""
    if not 0 <= near_tie <= 1:
        raise InputError(f"near_tie is a probability margin between 0 and 1, not {near_tie}")
    meta = context(source, run, phase=phase).meta
    frames = [compute(RouterCounts(layer, near_tie), source, run, phase=phase, **how) for layer in _logit_layers(source, run, meta)]
    frames = [f for f in frames if len(f)]
    if not frames:
        raise InputError("this run has no router logits; record it with logits enabled (moelens record --logits)")
    return result(pd.concat(frames, ignore_index=True), meta, "router_stats", near_tie=near_tie,
                  softmax="over each layer's routed experts", reference=_REFERENCE)


def _logit_layers(source: Any, run: int | None, meta: RoutingData) -> list[int]:
    """The layers with recorded logits: of an in-memory run, those it holds; of a store's run, one grouped
    read of ``router_logits`` (no pass for a layer without any)."""
    if isinstance(source, RoutingData):
        return [layer for layer, _ in _layers_with_logits(resolve(source))]
    rows = source.query("SELECT DISTINCT layer FROM router_logits WHERE run_id = ? AND logits IS NOT NULL", [int(run)])  # type: ignore[arg-type]
    return [int(layer) for layer in meta.layer_ids if layer in set(rows["layer"].astype(int))]


def router_token_stats(source: Source, run: int | None = None, *, layer: int, seq_id: int | None = None,
                       near_tie: float = 0.02, phase: str | None = None) -> pd.DataFrame:
    """Per token at one layer (optionally of one sequence): ``seq_id, pos, token, top1`` (the recorded first
    choice), ``entropy, norm_entropy, margin, logit_margin, near_tie``."""
    data = resolve(source, run, phase=phase)
    if seq_id is not None:
        data = data.select(data.seq_id == int(seq_id))
    li = data.layer_index(layer)
    logits = data.router_logits(layer)
    if logits is None:
        raise InputError(f"no router logits recorded for layer {layer}; record the run with logits enabled")
    v = token_router_values(logits)
    df = pd.DataFrame({"seq_id": data.seq_id, "pos": data.pos, "token": data.token_text(),
                       "top1": data.experts[li, :, 0], **v, "near_tie": v["margin"] < near_tie})
    return result(df, data, "router_token_stats", layer=layer, seq_id=seq_id, near_tie=near_tie, reference=_REFERENCE)
