"""Vocabulary specialization against three token targets and an expert's top
tokens with example contexts.

Why three targets: an expert can key on the token it reads (input), on what comes next (ground truth), or
on what the model is about to predict — OLMoE found the latter two increasingly explain later layers.
Why ``min_count``: every token id seen once scores p = 1, so rare ids inflate the unweighted mean; the
number of token ids used is always reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import consecutive_pairs, group_expert_counts, result
from moelens.analysis.chunked import Chunked, Context, Firsts, Keyed, compute, position_order
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

TARGETS = ("input", "next", "predicted")


def aligned_tokens(data: RoutingData, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(positions whose routing is used, the token id paired with each): ``input`` x_t; ``next`` x_{t+1}
    (a sequence's last token has no pair); ``predicted`` the model's argmax at t (where recorded)."""
    if target == "input":
        rows = np.flatnonzero(data.token_id >= 0)
        return rows, data.token_id[rows]
    if target == "next":
        rows = consecutive_pairs(data)
        rows = rows[data.token_id[rows + 1] >= 0]
        return rows, data.token_id[rows + 1]
    if target == "predicted":
        rows = np.flatnonzero(data.predicted_id >= 0)
        return rows, data.predicted_id[rows]
    raise InputError(f"target must be one of {TARGETS}, not {target!r}")


def order_key(data: RoutingData, rows: np.ndarray) -> np.ndarray:
    """int64 ``[len(rows), K]`` global position-then-rank order of slots: ``seq_id << 35 | pos << 7 | rank``
    (sequence ids and positions below 2^28, k below 128), comparable across batches."""
    tok = (data.seq_id[rows].astype(np.int64) << 35) | (data.pos[rows].astype(np.int64) << 7)
    return tok[:, None] | np.arange(data.k_max, dtype=np.int64)[None, :]


#: A batch's (token id, expert) cells are counted in a dense ``[distinct ids, E]`` array when it has at most
#: this many cells per routed slot (then a compiled pass and a scan of the array beat sorting the slots'
#: keys by ~10x); a batch with more distinct ids than that sorts.
DENSE_CELLS_PER_SLOT = 16


def token_expert_table(exp: np.ndarray, n_experts: int, ids: np.ndarray, code: np.ndarray, order: np.ndarray | None) -> Keyed:
    """Grouped `Keyed` of one layer's slots ``exp`` ``[n, K]`` of aligned positions whose token is
    ``ids[code]`` (``ids`` sorted, distinct): key ``token id · E + expert`` → ``count`` of routed slots and,
    with ``order`` (``[n, K]``), the ``first`` (smallest) order of those slots."""
    from moelens.analysis._kernels import jit, slot_first

    E = n_experts
    reducers = {"count": "sum"} if order is None else {"count": "sum", "first": "min"}
    if len(ids) * E > DENSE_CELLS_PER_SLOT * max(exp.size, 1):
        routed = exp >= 0
        keys = (ids[code][:, None] * E + exp)[routed]
        columns = {"count": np.ones(len(keys), np.int64)}
        if order is not None:
            columns["first"] = order[:, : exp.shape[1]][routed]
        return Keyed(keys, columns, reducers).grouped()
    counts = group_expert_counts(exp, E, code, len(ids)).ravel()
    cell = np.flatnonzero(counts)
    columns = {"count": counts[cell]}
    if order is not None:
        first = np.full(len(counts), np.iinfo(np.int64).max, np.int64)
        jit(slot_first)(exp, order[:, : exp.shape[1]], code, E, first)
        columns["first"] = first[cell]
    return Keyed(ids[cell // E] * E + cell % E, columns, reducers, grouped=True)  # sorted: ids are


@dataclass(frozen=True)
class TokenExpertCounts(Chunked):
    """Per layer a `Keyed` table (token id · E + expert → slot count, first slot's order) over aligned
    positions, and a `Keyed` of aligned occurrences N_x per token id. Grows with the vocabulary seen."""

    target: str = "input"
    min_count: int = 10
    normalize: bool = False
    by_expert: bool = False

    def map(self, batch: RoutingData) -> dict[str, Any]:
        rows, x = aligned_tokens(batch, self.target)
        x = x.astype(np.int64)
        ids, code, n = np.unique(x, return_inverse=True, return_counts=True)
        n_x = Keyed(ids, {"n": n.astype(np.int64)}, {"n": "sum"}, grouped=True)
        order = order_key(batch, rows) if self.by_expert else None
        layers = [token_expert_table(batch.experts[li, rows], int(E), ids, code, order) for li, E in enumerate(batch.n_experts)]
        return {"n_x": n_x, "layers": layers}

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        from moelens.analysis.summary_partials import token_expert_counts

        return token_expert_counts(store, ctx) if self.target == "input" else None

    def finish(self, partial: dict[str, Any], ctx: Context) -> pd.DataFrame:
        data = ctx.meta
        ids, n_x = partial["n_x"].table()
        keep = n_x["n"] >= max(self.min_count, 1)
        ids, n_x = ids[keep], n_x["n"][keep]
        out = []
        for li, layer in enumerate(data.layer_ids):
            E, k = int(data.n_experts[li]), int(data.top_k[li])
            keys, cols = partial["layers"][li].table()
            token, expert = keys // E, keys % E
            code = np.searchsorted(ids, token)
            found = (code < len(ids)) & (ids[np.minimum(code, max(len(ids) - 1, 0))] == token) if len(ids) else np.zeros(len(keys), bool)
            counts = np.zeros((len(ids), E), np.int64)
            counts[code[found], expert[found]] = cols["count"][found]
            p = _purity(counts, n_x, k, E, self.normalize)
            if not self.by_expert:
                out.append(pd.DataFrame({"layer": [int(layer)], "score": [float(p.mean()) if len(p) else np.nan], "n_token_ids": [len(ids)]}))
                continue
            first = np.full((len(ids), E), np.iinfo(np.int64).max, np.int64)
            first[code[found], expert[found]] = cols["first"][found]
            tied = counts == counts.max(axis=1, initial=0)[:, None]
            credited = np.where(tied, first, np.iinfo(np.int64).max).argmin(axis=1)
            n = np.bincount(credited, minlength=E)
            with np.errstate(invalid="ignore", divide="ignore"):
                score = np.bincount(credited, weights=p, minlength=E) / n
            out.append(pd.DataFrame({"layer": int(layer), "expert": np.arange(E), "score": score, "n_token_ids": n}))
        params = dict(target=self.target, min_count=self.min_count, normalize=self.normalize)
        if self.by_expert:
            df = pd.concat(out) if out else pd.DataFrame(columns=["layer", "expert", "score", "n_token_ids"])
            return result(df, data, "vocabulary_by_expert", **params,
                          reference="OLMoE scripts/run_moe_analysis.py do_token_analysis_layers_experts")  # fmt: skip
        df = pd.concat(out) if out else pd.DataFrame(columns=["layer", "score", "n_token_ids"])
        return result(df, data, "vocabulary_specialization", **params,
                      reference="OLMoE (arXiv 2409.02060) §5, scripts/run_moe_analysis.py")  # fmt: skip


def _purity(counts: np.ndarray, n_x: np.ndarray, k: int, E: int, normalize: bool) -> np.ndarray:
    """p_x per token id: (count of x's most frequent expert) / N_x; with ``normalize``, (p_x − k/E) / (1 − k/E)
    so uniform routing scores 0 (left as is when k ≥ E, where that rescaling divides by zero)."""
    p = counts.max(axis=1, initial=0) / np.maximum(n_x, 1)
    return (p - k / E) / (1 - k / E) if normalize and k < E else p


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise InputError(f"target must be one of {TARGETS}, not {target!r}")


def vocabulary_specialization(
    source: Any,
    run: int | None = None,
    *,
    phase: str | None = None,
    target: str = "input",
    min_count: int = 10,
    normalize: bool = False,
    **how: Any,
) -> pd.DataFrame:
    """Per layer: ``score`` = unweighted mean over token ids x (with N_x ≥ ``min_count`` aligned
    occurrences) of p_x = (count of x's most frequent expert) / N_x, and ``n_token_ids`` used. With
    ``normalize``: (p_x − k/E) / (1 − k/E). OLMoE ``scripts/run_moe_analysis.py``
    ``do_token_analysis_layers_experts`` (its ``min_count`` is 1) N_x counts
    aligned positions, including ones whose slots were dropped. The partial holds per (token id, expert)
    counts, so its memory grows with the vocabulary seen.
    """
    _check_target(target)
    return compute(TokenExpertCounts(target, min_count, normalize), source, run, phase=phase, **how)


def vocabulary_by_expert(
    source: Any,
    run: int | None = None,
    *,
    phase: str | None = None,
    target: str = "input",
    min_count: int = 10,
    normalize: bool = False,
    **how: Any,
) -> pd.DataFrame:
    """Per (layer, expert): ``score`` = mean p_x over the token ids credited to the expert (their most
    frequent expert; ties go to the expert seen first in position-then-rank order, as the reference's
    stable sort over a ``Counter``), with ``n_token_ids`` credited (score NaN when none)."""
    _check_target(target)
    return compute(TokenExpertCounts(target, min_count, normalize, by_expert=True), source, run, phase=phase, **how)


@dataclass(frozen=True)
class TopTokens(Chunked):
    """For one (layer, expert): per token id the aligned occurrences here and overall, the first
    ``n_contexts`` example contexts here, and each token id's text at its first occurrence. Grows with the
    vocabulary seen (held in memory)."""

    layer: int = 0
    expert: int = 0
    n: int = 20
    n_contexts: int = 3
    target: str = "input"
    window: int = 8
    text: bool = True

    def map(self, batch: RoutingData) -> dict[str, Any]:
        li = batch.layer_index(self.layer)
        rows, x = aligned_tokens(batch, self.target)
        here = (batch.experts[li, rows] == self.expert).any(axis=1)
        text = batch.token_text()
        order = position_order(batch.seq_id, batch.pos)
        examples = Firsts({}, self.n_contexts)
        for t, tok in zip(rows[here], x[here]):
            if len(examples.items.setdefault(int(tok), [])) < self.n_contexts:
                examples.items[int(tok)].append((int(order[t]), _context(batch, text, int(t), self.window)))
        ids, first_at = np.unique(batch.token_id, return_index=True)
        names = Firsts({int(i): [(int(order[f]), text[f])] for i, f in zip(ids, first_at)}, 1)
        return {
            "here": Keyed(x[here].astype(np.int64), {"n": np.ones(int(here.sum()), np.int64)}, {"n": "sum"}),
            "all": Keyed(x.astype(np.int64), {"n": np.ones(len(x), np.int64)}, {"n": "sum"}),
            "contexts": examples,
            "names": names,
        }

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        """Input target, every phase pooled: from ``token_experts`` plus bounded reads of ``tokens`` (and of
        ``routing`` for the contexts); other targets and a phase filter are streamed."""
        from moelens.analysis.summary_partials import top_tokens

        if self.target != "input":
            return None
        return top_tokens(store, ctx, self.layer, self.expert, self.n, self.n_contexts, self.window)

    def finish(self, partial: dict[str, Any], ctx: Context) -> pd.DataFrame:
        ids, here = partial["here"].table()
        all_ids, every = partial["all"].table()
        counts = here["n"]
        order = np.lexsort((ids, -counts))[: self.n]
        total = counts.sum()
        out = []
        for i in order:
            tok = int(ids[i])
            name = partial["names"].items.get(tok)
            out.append(
                {
                    "token_id": tok,
                    "token": name[0][1] if name else str(tok),
                    "count": int(counts[i]),
                    "share": counts[i] / total,
                    "token_rate": counts[i] / every["n"][np.searchsorted(all_ids, tok)],
                    "contexts": [c for _, c in partial["contexts"].items.get(tok, [])],
                }
            )
        return result(
            pd.DataFrame(out, columns=["token_id", "token", "count", "share", "token_rate", "contexts"]), ctx.meta,
            "expert_top_tokens", layer=self.layer, expert=self.expert, target=self.target, n=self.n,
            n_contexts=self.n_contexts, window=self.window, reference="[moelens]; OLMoE eid2token counters",
        )  # fmt: skip


def expert_top_tokens(
    source: Any,
    run: int | None = None,
    layer: int | None = None,
    expert: int | None = None,
    n: int = 20,
    n_contexts: int = 3,
    *,
    target: str = "input",
    phase: str | None = None,
    window: int = 8,
    **how: Any,
) -> pd.DataFrame:
    """The ``n`` token ids most often routed to (layer, expert) under ``target`` alignment: ``count``,
    ``share`` of the expert's aligned routings, ``token_rate`` = count / N_x (how much of that token goes
    here) and up to ``n_contexts`` example ``contexts`` (``window`` tokens either side inside the sequence,
    the routed position marked ⟦…⟧; the first occurrences). [moelens]; OLMoE ``eid2token`` counters."""
    if layer is None or expert is None:
        raise InputError("expert_top_tokens needs layer=... and expert=...")
    _check_target(target)
    meta = _layers_of(source, run)
    li = meta.layer_index(layer)
    if not 0 <= expert < meta.n_experts[li]:
        raise InputError(f"expert must be in 0..{meta.n_experts[li] - 1} for layer {layer}, not {expert}")
    return compute(TopTokens(int(layer), int(expert), n, n_contexts, target, window), source, run, phase=phase, **how)


def _layers_of(source: Any, run: int | None) -> RoutingData:
    """A token-free `RoutingData` with the layers of ``source`` (to check parameters before a pass)."""
    from moelens.analysis.stream import RunStream

    if isinstance(source, RoutingData):
        return source
    if run is None:
        raise InputError("give the run id: score(store, run, ...)")
    with RunStream(source, int(run)) as stream:
        return stream.meta


def _context(data: RoutingData, text: np.ndarray, t: int, window: int) -> str:
    lo = max(t - window, int(np.searchsorted(data.seq_id, data.seq_id[t], side="left")))
    hi = min(t + window + 1, int(np.searchsorted(data.seq_id, data.seq_id[t], side="right")))
    return "".join(text[lo:t]) + "⟦" + str(text[t]) + "⟧" + "".join(text[t + 1 : hi])
