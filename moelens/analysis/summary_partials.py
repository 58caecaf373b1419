"""Partials of scores rebuilt from a run's derived summaries (written by `moelens.analysis.summaries`).

Why a module of its own: each function here returns exactly the merged partial that the score's ``map`` over
every batch would have produced (integers equal, float sums up to rounding), so ``finish`` cannot tell the
two apart, and the score answers without reading ``routing``. Each returns None when a summary it needs
is not materialised; the score's own ``from_summaries`` decides which parameters can be answered at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis.chunked import Context, Firsts, High, Keyed, Low, Lowest, NeedsFullPass, position_hash, position_order
from moelens.analysis.data import RoutingData
from moelens.store.schema import summary_table


def label_tables(store: Any, ctx: Context, *columns: str) -> tuple[np.ndarray, list[list[np.ndarray]]] | None:
    """([D + 1] tokens per label code, for each of ``columns`` (default ``count``) of ``expert_counts`` per
    layer [D + 1, E]); code D = unlabelled. None when a summary is missing."""
    counts, tokens = read(store, ctx, "expert_counts"), read(store, ctx, "tokens")
    if counts is None or tokens is None:
        return None
    D = len(ctx.meta.label_names)
    n = np.bincount(label_codes(tokens, ctx.meta), weights=tokens["n_tokens"].to_numpy(), minlength=D + 1).astype(np.int64)
    codes = label_codes(counts, ctx.meta)
    return n, [layer_arrays(counts, ctx.meta, codes, D + 1, c, np.float64 if c == "gate_mass" else np.int64) for c in columns or ("count",)]


def label_codes(df: Any, data: Any) -> np.ndarray:
    """Label code of each summary row, D for unlabelled (vectorised: summaries have a row per label)."""
    codes = pd.Categorical(df["label"], categories=list(data.label_names)).codes.astype(np.int64)
    return np.where(codes < 0, len(data.label_names), codes)


def pair_counts_by_label(store: Any, ctx: Context) -> list[np.ndarray] | None:
    """Per layer ``[4, D + 1]`` consecutive-pair counts (n_pairs, same_first, n_overlap_pairs, overlap) by
    the pair's label code, from ``repetition``."""
    found = _labelled(store, ctx, "repetition")
    if found is None:
        return None
    rows, codes, D = found
    out = []
    for layer in ctx.meta.layer_ids:
        here = (rows["layer"] == layer).to_numpy()
        out.append(np.stack([np.bincount(codes[here], weights=rows[c].to_numpy()[here], minlength=D + 1).astype(np.int64)
                             for c in ("n_pairs", "same_first", "n_overlap_pairs", "overlap")]))  # fmt: skip
    return out


def token_set_counts(store: Any, ctx: Context, ids: Sequence[int], layers: Sequence[int]) -> tuple[int, list[np.ndarray]] | None:
    """(positions whose token id is in ``ids``, per layer position in ``layers`` ``[E]`` routed slots of
    those positions), from ``token_ids`` and ``token_experts`` — two grouped queries that read only those
    ids' rows (``token_experts`` is the largest summary: rows per layer × token id × expert)."""
    run = ctx.meta.origin.run_id if ctx.meta.origin is not None else None
    if run is None or not {"token_experts", "token_ids"} <= store.summary_names(run):
        return None
    where = "run_id = ? AND list_contains(?::BIGINT[], token_id)" + ("" if ctx.meta.phase_filter is None else " AND phase = ?")
    args = [int(run), sorted({int(t) for t in ids}), *([] if ctx.meta.phase_filter is None else [ctx.meta.phase_filter])]
    n_x = store.query(f"SELECT coalesce(sum(n), 0) AS n FROM {summary_table('token_ids')} WHERE {where}", args)["n"].iloc[0]
    rows = store.query(f"SELECT layer, expert, sum(count) AS count FROM {summary_table('token_experts')} WHERE {where} "
                       "GROUP BY layer, expert", args)  # fmt: skip
    out = []
    for li in layers:
        here = rows[rows["layer"] == ctx.meta.layer_ids[li]]
        out.append(np.bincount(here["expert"].to_numpy().astype(np.int64), weights=here["count"].to_numpy(),
                               minlength=int(ctx.meta.n_experts[li])).astype(np.int64))  # fmt: skip
    return int(n_x), out


def regex_token_ids(store: Any, ctx: Context, regex: str) -> list[int] | None:
    """The token ids whose text matches ``regex`` (searched, as `moelens.analysis.npmi.token_predicate`
    does per position), or None when that is not a property of the id: a position without a token id, or an
    id recorded with two texts (or with and without one) in this run."""
    run = ctx.meta.origin.run_id if ctx.meta.origin is not None else None
    if run is None or not hasattr(store, "query"):
        return None
    texts = store.query("SELECT token_id, count(DISTINCT coalesce(token, token_id::VARCHAR)) AS n_texts, "
                        "any_value(coalesce(token, token_id::VARCHAR)) AS text FROM tokens WHERE run_id = ? GROUP BY token_id", [int(run)])  # fmt: skip
    if (texts["token_id"] < 0).any() or (texts["n_texts"] > 1).any():
        return None
    pattern = re.compile(regex)
    return [int(t) for t, text in zip(texts["token_id"], texts["text"]) if pattern.search(str(text))]


def label_rows(n_tokens: np.ndarray, per_layer: list[np.ndarray], label: int | None) -> tuple[int, list[np.ndarray]]:
    """(tokens, per layer ``[E]``) of one label code, or of every token (``label`` None)."""
    if label is None:
        return int(n_tokens.sum()), [a.sum(axis=0) for a in per_layer]
    return int(n_tokens[label]), [a[label] for a in per_layer]


def _labelled(store: Any, ctx: Context, name: str) -> tuple[Any, np.ndarray, int] | None:
    """(summary ``name``'s rows, their label codes (D = unlabelled), D), or None when not materialised."""
    rows = read(store, ctx, name)
    return None if rows is None else (rows, label_codes(rows, ctx.meta), len(ctx.meta.label_names))


def permutation_sample(store: Any, ctx: Context, groups: Sequence[int | None], limit: int) -> tuple[list[np.ndarray], list[Lowest]] | None:
    """`moelens.analysis.repetition.RepetitionCounts`'s permutation statistics per group (a label code, D =
    unlabelled, None = every token): per layer ``[groups]`` tokens with a routed expert, from ``routed_tokens``,
    and per group the ``limit`` tokens of lowest seed-0 hash with their bitsets, merged from the cells of
    ``permutation_sample`` (the lowest of a union are the lowest of its cells' lowest)."""
    routed, sample = _labelled(store, ctx, "routed_tokens"), _labelled(store, ctx, "permutation_sample")
    if routed is None or sample is None:
        return None
    (rows, codes, _), (tokens, token_codes, _) = routed, sample

    def member(of: np.ndarray, group: int | None) -> np.ndarray:
        return np.ones(len(of), bool) if group is None else of == group

    n = rows["n"].to_numpy()
    counts = [np.array([n[(rows["layer"] == layer).to_numpy() & member(codes, g)].sum() for g in groups], np.int64)
              for layer in ctx.meta.layer_ids]  # fmt: skip
    L = ctx.meta.n_layers
    seq, pos = tokens["seq_id"].to_numpy(), tokens["pos"].to_numpy()
    bits = np.stack(tokens["bits"].to_numpy()).astype(np.uint64).reshape(len(tokens), L, -1) if len(tokens) else np.zeros((0, L, 1), np.uint64)
    key, order = position_hash(seq, pos, 0), position_order(seq, pos)
    words = [max(1, -(-int(E) // 64)) for E in ctx.meta.n_experts]
    samples = []
    for g in groups:
        m = member(token_codes, g)
        columns = {"seq": seq[m].astype(np.int32), "pos": pos[m].astype(np.int32), **{f"bits{li}": bits[m, li, : words[li]] for li in range(L)}}
        samples.append(Lowest(key[m], order[m], columns, limit))
    return counts, samples


def committee_units(store: Any, ctx: Context) -> list[tuple[Any, ...]] | None:
    """`moelens.analysis.committee.EciStats`'s partial over last prompt tokens, from ``committee_units``."""
    found = _labelled(store, ctx, "committee_units")
    if found is None:
        return None
    rows, codes, D = found
    out = []
    for li, layer in enumerate(ctx.meta.layer_ids):
        E = int(ctx.meta.n_experts[li])
        here = (rows["layer"] == layer).to_numpy() & (codes < D)
        d, e = codes[here], rows["expert"].to_numpy()[here].astype(np.int64)
        n = np.zeros(D, np.int64)
        n[d] = rows["n_units"].to_numpy()[here]
        stats = []
        for column, fill in (("count", 0), ("gate_mass", 0.0), ("gate_max", 0.0), ("gate_min", np.inf)):
            arr = np.full((D, E), fill, np.int64 if column == "count" else np.float64)
            arr[d, e] = rows[column].to_numpy()[here]
            stats.append(arr)
        out.append((n, stats[0], stats[1], High(stats[2]), Low(stats[3])))
    return out


def top_tokens(store: Any, ctx: Context, layer: int, expert: int, n: int, n_contexts: int, window: int) -> dict[str, Any] | None:
    """`moelens.analysis.vocabulary.TopTokens`'s partial (input target, every phase) for what its finish
    shows: one expert's ``token_experts`` rows (all of its token ids, so the order and shares are exact),
    and for the top ``n`` ids only their totals and first text (``tokens``) and their first ``n_contexts``
    routed occurrences, searched from the start of the run in growing seq_id windows of ``routing`` (the
    frequent ids are found in the first few sequences), with their context from ``tokens``."""
    run = ctx.meta.origin.run_id if ctx.meta.origin is not None else None
    if run is None or ctx.meta.phase_filter is not None or "token_experts" not in store.summary_names(run):
        return None
    here = store.query(f"SELECT token_id, sum(count) AS count FROM {summary_table('token_experts')} WHERE run_id = ? "
                       "AND layer = ? AND expert = ? GROUP BY token_id", [int(run), int(layer), int(expert)])  # fmt: skip
    ids_here = here["token_id"].to_numpy().astype(np.int64)
    counts = here["count"].to_numpy().astype(np.int64)
    top = [int(t) for t in ids_here[np.lexsort((ids_here, -counts))[:n]]]
    totals: dict[int, int] = {}
    names: dict[int, list[tuple[int, Any]]] = {}
    if top:
        marks = ", ".join("?" for _ in top)
        info = store.query(
            f"SELECT token_id, count(*) AS n, arg_min(coalesce(token, token_id::VARCHAR), seq_id::BIGINT * 4294967296 + pos) AS token "
            f"FROM tokens WHERE run_id = ? AND token_id IN ({marks}) GROUP BY token_id", [int(run), *top])  # fmt: skip
        totals = dict(zip(info["token_id"].astype(int), info["n"].astype(int)))
        names = {int(t): [(0, name)] for t, name in zip(info["token_id"], info["token"])}
    all_ids = np.array(sorted(totals), np.int64)
    return {
        "here": Keyed(ids_here, {"n": counts}, {"n": "sum"}),
        "all": Keyed(all_ids, {"n": np.array([totals[t] for t in all_ids], np.int64)}, {"n": "sum"}),
        "contexts": Firsts(_contexts(store, ctx, run, layer, expert, top, n_contexts, window), n_contexts),
        "names": Firsts(names, 1),
    }


def _contexts(store: Any, ctx: Context, run: int, layer: int, expert: int, ids: list[int], n_contexts: int, window: int) -> dict[int, list[tuple[int, str]]]:
    """The first ``n_contexts`` (order, context) of each id in ``ids`` routed to (layer, expert)."""
    if n_contexts <= 0 or not ids or not len(ctx.sequences):
        return {}
    lo, last = int(ctx.sequences["seq_id"].min()), int(ctx.sequences["seq_id"].max())
    marks = ", ".join("?" for _ in ids)
    found: dict[int, list[tuple[int, int]]] = {}
    span = 64
    while lo <= last and any(len(found.get(t, [])) < n_contexts for t in ids):
        hi = lo + span - 1
        hits = store.query(
            f"SELECT t.token_id, t.seq_id, t.pos FROM tokens t SEMI JOIN (SELECT seq_id, pos FROM routing WHERE run_id = ? "
            f"AND layer = ? AND expert = ? AND seq_id BETWEEN ? AND ? AND (weight IS NULL OR weight <> 0)) r USING (seq_id, pos) "
            f"WHERE t.run_id = ? AND t.seq_id BETWEEN ? AND ? AND t.token_id IN ({marks}) ORDER BY t.seq_id, t.pos",
            [int(run), int(layer), int(expert), lo, hi, int(run), lo, hi, *ids])  # fmt: skip
        for t, s, p in hits.itertuples(index=False):
            if len(found.setdefault(int(t), [])) < n_contexts:
                found[int(t)].append((int(s), int(p)))
        lo, span = hi + 1, span * 4
    seqs = sorted({s for places in found.values() for s, _ in places})
    if not seqs:
        return {}
    text = store.query(
        f"SELECT seq_id, pos, coalesce(token, token_id::VARCHAR) AS token FROM tokens WHERE run_id = ? "
        f"AND seq_id IN ({', '.join('?' for _ in seqs)}) ORDER BY seq_id, pos", [int(run), *seqs])  # fmt: skip
    by_seq = {int(s): (g["pos"].to_numpy(), g["token"].tolist()) for s, g in text.groupby("seq_id")}
    out: dict[int, list[tuple[int, str]]] = {}
    for t, places in found.items():
        for s, p in places:
            pos, toks = by_seq[s]
            at = int(np.searchsorted(pos, p))
            a, b = max(at - window, 0), min(at + window + 1, len(toks))
            context = "".join(toks[a:at]) + "⟦" + str(toks[at]) + "⟧" + "".join(toks[at + 1 : b])
            out.setdefault(t, []).append(((s << 32) | p, context))
    return out


def read(store: Any, ctx: Context, name: str) -> Any:
    """A summary as a DataFrame restricted to the context's phase and label filter, or None when not
    materialised (or the store cannot hold summaries, or a label filter meets a summary without labels)."""
    if not hasattr(store, "read_summary") or ctx.meta.origin is None:
        return None
    table = store.read_summary(ctx.meta.origin.run_id, name)
    if table is None or (ctx.only_label is not None and "label" not in table.column_names):
        return None
    df = table.to_pandas()
    if ctx.only_label is not None:
        df = df[df["label"] == ctx.only_label]
    phase = ctx.meta.phase_filter
    return df if phase is None else df[df["phase"] == phase]


def check_budget(store: Any, ctx: Context, name: str) -> None:
    """Refuse (`NeedsFullPass`) to read a whole summary of more rows than the caller's pass budget: the per token
    id tables of a big run hold tens of millions of rows, as long to read as a pass over the routing (the others
    are bounded by layers × experts², whatever the run's size, and are always read)."""
    if ctx.max_pass_slots is None or ctx.meta.origin is None:
        return
    found = store.query("SELECT n_rows FROM summaries WHERE run_id = ? AND name = ?", [int(ctx.meta.origin.run_id), name])
    rows = int(found["n_rows"].iloc[0]) if len(found) else 0
    if rows > ctx.max_pass_slots:
        raise NeedsFullPass(f"{type(ctx.chunked).__name__} (from the {rows:,}-row summary {name})", ctx.n_tokens, rows, 1, "summary rows")


def layer_arrays(df: Any, data: RoutingData, groups: np.ndarray, n_groups: int, column: str, dtype: Any) -> list[np.ndarray]:
    out = []
    for li, layer in enumerate(data.layer_ids):
        E = int(data.n_experts[li])
        here = (df["layer"] == layer).to_numpy()
        arr = np.zeros((n_groups, E), dtype)
        np.add.at(arr, (groups[here], df["expert"].to_numpy()[here].astype(np.int64)), df[column].to_numpy()[here])
        out.append(arr)
    return out


def expert_counts(store: Any, ctx: Context, by_label: bool) -> Any:
    """`moelens.analysis.load.ExpertCounts`'s partial from ``expert_counts`` and ``tokens``."""
    counts, tokens = read(store, ctx, "expert_counts"), read(store, ctx, "tokens")
    if counts is None or tokens is None:
        return None
    D = len(ctx.meta.label_names)
    n_groups = D + 1 if by_label else 1
    group = label_codes(counts, ctx.meta) if by_label else np.zeros(len(counts), np.int64)
    tok_group = label_codes(tokens, ctx.meta) if by_label else np.zeros(len(tokens), np.int64)
    return {
        "n_tok": np.bincount(tok_group, weights=tokens["n_tokens"].to_numpy(), minlength=n_groups).astype(np.int64),
        "count": layer_arrays(counts, ctx.meta, group, n_groups, "count", np.int64),
        "mass": layer_arrays(counts, ctx.meta, group, n_groups, "gate_mass", np.float64),
    }


def domain_counts(store: Any, ctx: Context, top1: bool) -> Any:
    """`moelens.analysis.domain.DomainCounts`'s partial from ``expert_counts`` and ``tokens``."""
    counts, tokens = read(store, ctx, "expert_counts"), read(store, ctx, "tokens")
    if counts is None or tokens is None:
        return None
    D = len(ctx.meta.label_names)
    column = "top1" if top1 else "count"
    by_label = layer_arrays(counts, ctx.meta, label_codes(counts, ctx.meta), D + 1, column, np.int64)
    overall = layer_arrays(counts, ctx.meta, np.zeros(len(counts), np.int64), 1, column, np.int64)
    n_d = np.bincount(label_codes(tokens, ctx.meta), weights=tokens["n_tokens"].to_numpy(), minlength=D + 1).astype(np.int64)
    return {"n_d": n_d[:D], "by_label": [a[:D] for a in by_label], "overall": [a[0] for a in overall]}


def coactivation_counts(store: Any, ctx: Context) -> Any:
    """`moelens.analysis.coactivation.CoactivationCounts`'s partial (all pairs) from the summaries."""
    pairs, counts, tokens = read(store, ctx, "coactivation"), read(store, ctx, "expert_counts"), read(store, ctx, "tokens")
    if pairs is None or counts is None or tokens is None:
        return None
    n = layer_arrays(counts, ctx.meta, np.zeros(len(counts), np.int64), 1, "count", np.int64)
    n_ij = []
    for li, layer in enumerate(ctx.meta.layer_ids):
        E = int(ctx.meta.n_experts[li])
        here = pairs[pairs["layer"] == layer]
        square = np.zeros((E, E), np.int64)
        np.add.at(square, (here["expert_i"].to_numpy().astype(np.int64), here["expert_j"].to_numpy().astype(np.int64)), here["n_ij"].to_numpy())
        n_ij.append(square + square.T)
    return {"n_tokens": int(tokens["n_tokens"].sum()), "n": [a[0] for a in n], "n_ij": n_ij}


def transition_counts_of(store: Any, ctx: Context, top1: bool) -> Any:
    """`moelens.analysis.transitions.TransitionCounts`'s partial from ``transitions``."""
    rows = read(store, ctx, "transitions")
    if rows is None:
        return None
    out = []
    for li in range(ctx.meta.n_layers - 1):
        E, E2 = int(ctx.meta.n_experts[li]), int(ctx.meta.n_experts[li + 1])
        here = rows[rows["layer"] == ctx.meta.layer_ids[li]]
        counts = np.zeros((E, E2), np.int64)
        np.add.at(counts, (here["expert"].to_numpy().astype(np.int64), here["next_expert"].to_numpy().astype(np.int64)), here["top1" if top1 else "all_slots"].to_numpy())
        out.append(counts)
    return out


def token_expert_counts(store: Any, ctx: Context) -> Any:
    """`moelens.analysis.vocabulary.TokenExpertCounts`'s partial (input target) from ``token_experts`` and
    ``token_ids``, holding per (layer, token id) only the cell `finish` reads: the expert with the most routed
    slots (ties: the one seen first), computed in SQL over the stored rows (memory bounded by DuckDB's, not by
    the tens of millions of cells of a big run). Phases are pooled unless the context filters one."""
    if ctx.meta.origin is None or not {"token_experts", "token_ids"} <= set(store.summary_names(ctx.meta.origin.run_id)):
        return None
    check_budget(store, ctx, "token_experts")
    run, phase = int(ctx.meta.origin.run_id), ctx.meta.phase_filter
    where, args = ("run_id = ?", [run]) if phase is None else ("run_id = ? AND phase = ?", [run, phase])
    ids = store.arrow(f"SELECT token_id, sum(n) AS n FROM {summary_table('token_ids')} WHERE {where} GROUP BY token_id ORDER BY token_id", args)
    phases = store.query(f"SELECT count(DISTINCT coalesce(phase, '')) AS n FROM {summary_table('token_ids')} WHERE {where}", args)
    cells = (f"(SELECT layer, token_id, expert, sum(count) AS n, min(first_at) AS first FROM {summary_table('token_experts')} "
             f"WHERE {where} GROUP BY ALL)") if int(phases["n"].iloc[0]) > 1 else (  # one phase: a cell is one row
             f"(SELECT layer, token_id, expert, count AS n, first_at AS first FROM {summary_table('token_experts')} WHERE {where})")
    rank = "-n * (1::HUGEINT << 64) + first"  # most slots first, then the earliest first slot
    top = store.arrow(f"SELECT layer, token_id, arg_min(expert, {rank}) AS expert, max(n) AS n, arg_min(first, {rank}) AS first "
                      f"FROM {cells} GROUP BY layer, token_id ORDER BY layer, token_id", args)
    n_x = Keyed(ids.column("token_id").to_numpy().astype(np.int64), {"n": ids.column("n").to_numpy().astype(np.int64)}, {"n": "sum"}, grouped=True)
    layer = top.column("layer").to_numpy()
    token, expert = top.column("token_id").to_numpy().astype(np.int64), top.column("expert").to_numpy().astype(np.int64)
    count, first = top.column("n").to_numpy().astype(np.int64), top.column("first").to_numpy().astype(np.int64)
    layers = []
    for li, lid in enumerate(ctx.meta.layer_ids):
        here = layer == lid
        E = int(ctx.meta.n_experts[li])
        layers.append(Keyed(token[here] * E + expert[here], {"count": count[here], "first": first[here]}, {"count": "sum", "first": "min"}, grouped=True))
    return {"n_x": n_x, "layers": layers}
