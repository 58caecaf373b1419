"""Expert-importance scores for pruning: REAP, EAN/MAN, EASY-EP, frequency and ESFT.

All of them are ratios of a few per-(layer, expert) sums over routed slots (count, gate mass, Σ‖f‖, Σ g‖f‖,
Σ w‖f‖·max(1 − cos, 0), ...), so they are computed as map → merge → finish: `map_rows` turns one batch of
routed rows (whole sequences) into `ImportanceSums`, batches merge by elementwise addition, and each score's
finish divides. Batches come from the store as bounded SQL over seq_id ranges (routing joined with
``expert_contributions`` / ``block_residuals`` / ``router_logits``), so memory stays bounded on any run.

Conventions: a slot is routed when its expert id is ≥ 0 and its gate weight > 0 (capacity drops and weight-0
slots route nothing). ‖f_j(x)‖ is the expert's output norm before gating, as recorded with ``contributions=True``.
An expert that never received a token scores 0 (it is the first one a pruner removes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from moelens.errors import InputError
from moelens.store import TraceStore

#: How REAP's gate g_j(x) is taken: the weights the model used, or (from router logits) softmax over all E,
#: optionally renormalised over the token's selected experts as CerebrasResearch/reap does with norm_topk_prob.
GATES = ("used", "softmax", "softmax_renorm")
ESFT_BY = ("gate", "token")
#: Routing rows per batch of the joined reads (~100 bytes each in pandas with norms and cosines: ~400 MB).
BATCH_ROWS = 1 << 22
_SUMS = ("count", "gate_mass", "norm_sum", "gated_norm_sum", "easy_ep_sum")

Source = TraceStore | pd.DataFrame


@dataclass
class ImportanceSums:
    """Additive per-(layer, expert) statistics of one batch or of a whole run. ``sums[name]`` is [L, E_max]."""

    layers: np.ndarray  #: int[L], the model's layer ids
    n_experts: np.ndarray  #: int[L]
    top_k: np.ndarray  #: int[L]
    n_tokens: int = 0  #: tokens seen (every MoE layer routes every token)
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        width = int(self.n_experts.max()) if len(self.n_experts) else 0
        for name in _SUMS:
            self.sums.setdefault(name, np.zeros((len(self.layers), width)))

    def __add__(self, other: ImportanceSums) -> ImportanceSums:
        """Merging two batches: exact, order-free elementwise addition."""
        if not np.array_equal(self.layers, other.layers):
            raise ValueError("cannot merge sums of different layer layouts")
        return ImportanceSums(self.layers, self.n_experts, self.top_k, self.n_tokens + other.n_tokens,
                              {k: self.sums[k] + other.sums[k] for k in _SUMS})


def _softmax_gate(rows: pd.DataFrame, renorm: bool) -> np.ndarray:
    """g_j = softmax(z)_j over all E from each row's logits; with ``renorm`` divided by the sum over the
    token's routed slots in that layer (equal to a softmax over the selected logits)."""
    logits = rows["logits"].to_numpy()
    if len(logits) and any(v is None for v in logits):
        raise InputError("the softmax gate needs router logits for every token: record the run with --logits")
    experts = rows["expert"].to_numpy().astype(np.int64)
    lengths = np.fromiter((len(z) for z in logits), np.int64, len(logits))
    gate = np.empty(len(rows))
    for n in np.unique(lengths):  # layers may differ in E: one vectorised softmax per width
        at = np.flatnonzero(lengths == n)
        z = np.stack([np.asarray(logits[i], np.float64) for i in at])
        p = np.exp(z - z.max(axis=1, keepdims=True))
        gate[at] = p[np.arange(len(at)), experts[at]] / p.sum(axis=1)
    if renorm:
        _, token = np.unique(rows[["seq_id", "pos", "layer"]].to_numpy(), axis=0, return_inverse=True)
        gate /= np.bincount(token.ravel(), weights=gate)[token.ravel()]
    return gate


def map_rows(rows: pd.DataFrame, layout: ImportanceSums, *, n_tokens: int, gate: str = "used") -> ImportanceSums:
    """The sums of one batch of routed rows (``layer, expert, weight`` and, when present, ``norm``, ``cos``,
    ``logits``, ``seq_id``, ``pos``). ``layout`` gives the layers and expert counts (its sums are ignored)."""
    out = ImportanceSums(layout.layers, layout.n_experts, layout.top_k, n_tokens)
    rows = rows[(rows["expert"].to_numpy() >= 0) & (rows["weight"].to_numpy() > 0)]
    if rows.empty:
        return out
    width = out.sums["count"].shape[1]
    layer_index = np.searchsorted(out.layers, rows["layer"].to_numpy())
    keys = layer_index * width + rows["expert"].to_numpy().astype(np.int64)
    weight = rows["weight"].to_numpy(np.float64)
    g = weight if gate == "used" else _softmax_gate(rows, renorm=gate == "softmax_renorm")
    norm = rows["norm"].to_numpy(np.float64) if "norm" in rows else np.full(len(rows), np.nan)
    cos = rows["cos"].to_numpy(np.float64) if "cos" in rows else np.full(len(rows), np.nan)
    values = {
        "count": None,
        "gate_mass": weight,
        "norm_sum": norm,
        "gated_norm_sum": g * norm,
        "easy_ep_sum": weight * norm * np.maximum(1.0 - cos, 0.0),
    }
    for name, w in values.items():
        out.sums[name] = np.bincount(keys, weights=w, minlength=out.sums[name].size).reshape(-1, width)
    return out


# -- reading batches from the store ---------------------------------------------------------------------------


def _layout(store: TraceStore, run: int) -> ImportanceSums:
    layers = store.layers(run).sort_values("layer")
    if layers.empty:
        raise InputError(f"run {run} has no MoE layers recorded")
    return ImportanceSums(layers["layer"].to_numpy(), layers["n_experts"].to_numpy(), layers["top_k"].to_numpy())


def _has_rows(store: TraceStore, table: str, run: int) -> bool:
    try:
        return bool(store.query(f"SELECT count(*) > 0 AS has FROM (SELECT 1 FROM {table} WHERE run_id = ? LIMIT 1)",
                                [run])["has"][0])
    except Exception:  # a store written before the table existed
        return False


def _batches(store: TraceStore, run: int, *, norms: bool, logits: bool, phase: str | None, label: str | None,
             batch_sequences: int | None) -> Iterator[tuple[pd.DataFrame, int]]:
    """``(routed rows, tokens)`` for consecutive seq_id ranges of whole sequences, one bounded query each
    (``batch_sequences`` per range; None: as many as hold about `BATCH_ROWS` routing rows)."""
    store.run(run)  # RunNotFoundError for a bad id
    if norms and not _has_rows(store, "expert_contributions", run):
        raise InputError(f"run {run} has no expert contributions: record it with --contributions (contributions=True)")
    if logits and not _has_rows(store, "router_logits", run):
        raise InputError(f"run {run} has no router logits: record it with --logits for the softmax gate")
    cols = ["r.seq_id", "r.pos", "r.layer", "r.expert", "r.weight"]
    joins = []
    if norms:
        cols += ["c.norm", "b.cos"]
        joins += ["LEFT JOIN expert_contributions c USING (run_id, seq_id, pos, layer, rank)",
                  "LEFT JOIN block_residuals b USING (run_id, seq_id, pos, layer)"]
    if logits:
        cols.append("z.logits")
        joins.append("LEFT JOIN router_logits z USING (run_id, seq_id, pos, layer)")
    where, params = ["t.run_id = ?", "t.seq_id >= ?", "t.seq_id < ?"], []
    if phase is not None:
        where.append("t.phase = ?")
    if label is not None:
        where.append("t.seq_id IN (SELECT seq_id FROM sequences WHERE run_id = t.run_id AND label = ?)")
    extra = [v for v in (phase, label) if v is not None]
    n_seq = int(store.query("SELECT coalesce(max(seq_id) + 1, 0) AS n FROM sequences WHERE run_id = ?", [run])["n"][0])
    if batch_sequences is None:
        rows = int(store.query("SELECT count(*) AS n FROM routing WHERE run_id = ?", [run])["n"][0])
        batch_sequences = max(1, BATCH_ROWS * max(n_seq, 1) // max(rows, 1))
    token_sql = f"SELECT t.run_id, t.seq_id, t.pos FROM tokens t WHERE {' AND '.join(where)}"
    rows_sql = (f"SELECT {', '.join(cols)} FROM ({token_sql}) t JOIN routing r USING (run_id, seq_id, pos) "
                f"{' '.join(joins)} WHERE r.expert >= 0 AND r.weight > 0")
    for lo in range(0, n_seq, batch_sequences):
        params = [run, lo, lo + batch_sequences, *extra]
        n_tokens = int(store.query(f"SELECT count(*) AS n FROM ({token_sql})", params)["n"][0])
        if n_tokens:
            yield store.query(rows_sql, params), n_tokens


def importance_sums(source: Source, run: int | None = None, *, gate: str = "used", norms: bool = True,
                    phase: str | None = None, label: str | None = None, batch_sequences: int | None = None,
                    layout: ImportanceSums | None = None) -> ImportanceSums:
    """Map every batch and merge: the run's (or an in-memory rows frame's) `ImportanceSums`."""
    if gate not in GATES:
        raise InputError(f"gate must be one of {GATES}, not {gate!r}")
    if isinstance(source, pd.DataFrame):
        if layout is None:  # in-memory rows: E = largest expert id + 1, k = most slots of one token
            layers = np.unique(source["layer"].to_numpy())
            width = int(source["expert"].max()) + 1 if len(source) else 0
            k = int(source.groupby(["seq_id", "pos", "layer"]).size().max()) if len(source) else 1
            layout = ImportanceSums(layers, np.full(len(layers), width), np.full(len(layers), k))
        n_tokens = len(source[["seq_id", "pos"]].drop_duplicates()) if len(source) else 0
        return map_rows(source, layout, n_tokens=n_tokens, gate=gate)
    if not isinstance(source, TraceStore) or run is None:
        raise InputError("give a trace store and a run id (or a DataFrame of contribution rows)")
    layout = _layout(source, int(run))
    if not norms and gate == "used":  # counts and gate mass only: expert_load's partial (summaries, or a stream)
        return _routing_sums(source, int(run), layout, phase, label)
    total = ImportanceSums(layout.layers, layout.n_experts, layout.top_k)
    for rows, n_tokens in _batches(source, int(run), norms=norms, logits=gate != "used", phase=phase, label=label,
                                   batch_sequences=batch_sequences):
        total = total + map_rows(rows, layout, n_tokens=n_tokens, gate=gate)
    return total


def _routing_sums(store: TraceStore, run: int, layout: ImportanceSums, phase: str | None, label: str | None) -> ImportanceSums:
    """``count`` and ``gate_mass`` from `ExpertCounts` (the partial of ``expert_load``): it finishes from the
    run's summaries when they exist and otherwise streams the run in bounded batches."""
    from moelens.analysis.chunked import compute_partial
    from moelens.analysis.load import ExpertCounts

    partial, ctx = compute_partial(ExpertCounts(by_label=label is not None), store, run, phase=phase)
    names = ctx.meta.label_names
    if label is not None and label not in names:
        raise InputError(f"run {run} has no sequences labelled {label!r}; its labels are: {', '.join(names) or 'none'}")
    group = 0 if label is None else names.index(label)
    out = ImportanceSums(layout.layers, layout.n_experts, layout.top_k, int(partial["n_tok"][group]))
    for li in range(len(layout.layers)):
        E = int(layout.n_experts[li])
        out.sums["count"][li, :E] = partial["count"][li][group]
        out.sums["gate_mass"][li, :E] = partial["mass"][li][group]
    return out


# -- finish: the scores ------------------------------------------------------------------------------------------


def _frame(sums: ImportanceSums, name: str, values: np.ndarray, run: int | None, reference: str,
           **params: Any) -> pd.DataFrame:
    """Long (layer, expert) frame of ``values`` [L, E_max] as column ``name`` and as ``score`` (the ranking)."""
    rows = []
    for li, layer in enumerate(sums.layers):
        E = int(sums.n_experts[li])
        rows.append(pd.DataFrame({
            "layer": int(layer), "expert": np.arange(E),
            "count": sums.sums["count"][li, :E].astype(np.int64), "gate_mass": sums.sums["gate_mass"][li, :E],
            name: values[li, :E],
        }))
    df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["layer", "expert", "count", name])
    df["score"] = df[name]
    df.attrs["params"] = {"score": name, "run": run, "n_tokens": sums.n_tokens, "reference": reference,
                          "not_routed": "capacity-dropped and weight-0 slots are not routed; never-routed experts score 0",
                          **params}
    return df


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)


def reap(source: Source, run: int | None = None, *, gate: str = "used", phase: str | None = None,
         label: str | None = None) -> pd.DataFrame:
    """REAP saliency S_j = mean over tokens routed to j of g_j(x)·‖f_j(x)‖₂ (Lasby et al., arXiv 2510.13999).
    ``gate='used'``: the weights the model applied (after its own normalisation and scaling, as llm-compressor);
    ``'softmax'`` / ``'softmax_renorm'``: softmax of the router logits over all E, renormalised over the
    selected experts for the latter (CerebrasResearch/reap with norm_topk_prob); these need ``--logits``."""
    sums = importance_sums(source, run, gate=gate, phase=phase, label=label)
    return _frame(sums, "reap", _ratio(sums.sums["gated_norm_sum"], sums.sums["count"]), run,
                  "REAP, arXiv 2510.13999", gate=gate, phase=phase, label=label)


def ean(source: Source, run: int | None = None, *, phase: str | None = None, label: str | None = None) -> pd.DataFrame:
    """EAN: summed expert output norm Σ_{x routed to j} ‖f_j(x)‖₂ (the un-gated 'expert activation norm'
    baseline of REAP, arXiv 2510.13999)."""
    sums = importance_sums(source, run, phase=phase, label=label)
    return _frame(sums, "ean", sums.sums["norm_sum"], run, "EAN, arXiv 2510.13999", phase=phase, label=label)


def man(source: Source, run: int | None = None, *, phase: str | None = None, label: str | None = None) -> pd.DataFrame:
    """MAN: mean expert output norm over the tokens routed to j (arXiv 2606.15716; REAP's ean_mean)."""
    sums = importance_sums(source, run, phase=phase, label=label)
    return _frame(sums, "man", _ratio(sums.sums["norm_sum"], sums.sums["count"]), run, "MAN, arXiv 2606.15716",
                  phase=phase, label=label)


def frequency(source: Source, run: int | None = None, *, weighted: bool = False, phase: str | None = None,
              label: str | None = None) -> pd.DataFrame:
    """Routing frequency: routed-slot ``count`` (or, ``weighted``, the gate mass Σ g) per expert — the
    classic pruning baseline; needs routing only."""
    sums = importance_sums(source, run, norms=False, phase=phase, label=label)
    values = sums.sums["gate_mass" if weighted else "count"]
    return _frame(sums, "frequency", values, run, "frequency baseline (REAP arXiv 2510.13999 §5)",
                  weighted=weighted, phase=phase, label=label)


def easy_ep(source: Source, run: int | None = None, *, phase: str | None = None, label: str | None = None) -> pd.DataFrame:
    """EASY-EP: I(E_j) = Σ_t w_{t,j}·‖E_j(u_t)‖₂·max(1 − cos(x_t, x_t + r_t), 0), where r_t is the routed
    experts' output (shared experts excluded) and w the weights the model used (Dong et al., arXiv 2504.06792)."""
    sums = importance_sums(source, run, phase=phase, label=label)
    return _frame(sums, "easy_ep", sums.sums["easy_ep_sum"], run, "EASY-EP, arXiv 2504.06792", phase=phase, label=label)


def esft(source: Source, run: int | None = None, *, by: str = "gate", top_p: float = 0.2, phase: str | None = None,
         label: str | None = None) -> pd.DataFrame:
    """ESFT relevance (Wang et al., arXiv 2407.01906; deepseek-ai/ESFT): ``gate_relevance`` Σ_t g_{t,j} / N and
    ``token_relevance`` (n_j / k) / N over the N tokens; per layer, experts in descending ``by`` relevance are
    kept while the cumulative relevance of those before is below ``top_p`` (``keep``)."""
    if by not in ESFT_BY:
        raise InputError(f"by must be one of {ESFT_BY}, not {by!r}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], not {top_p}")
    sums = importance_sums(source, run, norms=False, phase=phase, label=label)
    n = max(sums.n_tokens, 1)
    gate_rel = sums.sums["gate_mass"] / n
    token_rel = sums.sums["count"] / sums.top_k[:, None] / n
    df = _frame(sums, "esft", gate_rel if by == "gate" else token_rel, run, "ESFT, arXiv 2407.01906",
                by=by, top_p=top_p, phase=phase, label=label)
    df.insert(4, "gate_relevance", np.concatenate([gate_rel[i, :E] for i, E in enumerate(sums.n_experts)]))
    df.insert(5, "token_relevance", np.concatenate([token_rel[i, :E] for i, E in enumerate(sums.n_experts)]))
    df["keep"] = False
    for _, group in df.groupby("layer"):
        ordered = group.sort_values(["esft", "expert"], ascending=[False, True], kind="stable")
        before = ordered["esft"].cumsum() - ordered["esft"]
        df.loc[ordered.index[before.to_numpy() < top_p], "keep"] = True
    return df


IMPORTANCE_SCORES = ("reap", "ean", "man", "frequency", "easy_ep", "esft")
