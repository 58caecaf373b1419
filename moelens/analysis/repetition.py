"""Consecutive-token expert repetition — Mixtral Table 5.

Why the extra baselines: the uniform rates (1/E, 1 − C(E−k,k)/C(E,k)) assume balanced routing, which no
real router has; the load-aware Σq² and a permutation baseline (each token paired with a random
non-adjacent token of the same group) separate "consecutive tokens share experts" from "a few experts are
popular" (the bundled demo: random-init routing already beats 1/E in deep layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import consecutive_pairs, group_expert_counts, result
from moelens.analysis.chunked import Chunked, Context, Lowest, compute, position_hash, position_order
from moelens.analysis._sets import bitsets, intersection_size
from moelens.analysis.data import RoutingData


def uniform_overlap(n_experts: int, k: int) -> float:
    """P(two independent uniform top-k sets share an expert) = 1 − C(E−k, k) / C(E, k)."""
    return 1.0 - comb(n_experts - k, k) / comb(n_experts, k) if k <= n_experts else float("nan")


def first_choice_repeats(data: RoutingData, li: int, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For pairs (t, t+1): which have a first choice on both sides, and whether the two are equal."""
    a = data.experts[li, pairs, 0]
    b = data.experts[li, pairs + 1, 0]
    valid = (a >= 0) & (b >= 0)
    return valid, valid & (a == b)


#: Tokens per group whose pairs estimate ``perm_overlap`` (all pairs of a smaller group).
PERM_SAMPLE = 1024


@dataclass(frozen=True)
class RepetitionCounts(Chunked):
    """Per (layer, group): consecutive-pair counts, group tokens, first-choice counts, and a
    bottom-`PERM_SAMPLE` hash sample of tokens (their (seq_id, pos) and expert sets) for the overlap baseline."""

    by_label: bool = False
    seed: int = 0
    permutation: bool = True
    label_summaries = True  # every summary it reads is keyed by label: a label filter answers from them too

    def map(self, batch: RoutingData) -> dict[str, Any]:
        groups = _groups(batch, self.by_label)
        pairs = consecutive_pairs(batch)
        bits = [bitsets(batch.experts[li], int(E)) for li, E in enumerate(batch.n_experts)]
        layers = []
        for li, E in enumerate(batch.n_experts):
            has_any = bits[li].any(axis=1)
            first_ok, same = first_choice_repeats(batch, li, pairs)
            overlap_ok = has_any[pairs] & has_any[pairs + 1]
            overlap = intersection_size(bits[li][pairs], bits[li][pairs + 1]) > 0
            per_group = []
            for code in groups:
                in_pair = batch.label[pairs] == code if code is not None else np.ones(len(pairs), bool)
                in_tok = batch.label == code if code is not None else np.ones(batch.n_tokens, bool)
                q = group_expert_counts(batch.experts[li, in_tok, :1], int(E))[0]
                counts = [(first_ok & in_pair).sum(), (same & in_pair).sum(), (overlap_ok & in_pair).sum(),
                          (overlap & in_pair).sum(), (in_tok & has_any).sum(), in_tok.sum()]  # fmt: skip
                per_group.append(np.r_[np.array(counts, np.int64), q])
            layers.append(per_group)
        if not self.permutation:
            return {"counts": layers, "sample": [None for _ in groups]}
        key = position_hash(batch.seq_id, batch.pos, self.seed)
        order = position_order(batch.seq_id, batch.pos)
        samples = []
        for code in groups:
            rows = np.flatnonzero(batch.label == code) if code is not None else np.arange(batch.n_tokens)
            columns = {"seq": batch.seq_id[rows], "pos": batch.pos[rows], **{f"bits{li}": b[rows] for li, b in enumerate(bits)}}
            samples.append(Lowest(key[rows], order[rows], columns, PERM_SAMPLE))
        return {"counts": layers, "sample": samples}

    def from_summaries(self, store: Any, ctx: Context) -> Any:
        """For any phase filter: pair counts from ``repetition``, group sizes from ``tokens``, first-choice
        counts from ``expert_counts``; the permutation baselines (``seed=0``, the seed the summary's sample is
        drawn with) from ``routed_tokens`` and ``permutation_sample``. Another seed: None (streamed)."""
        from moelens.analysis.summary_partials import label_rows, label_tables, pair_counts_by_label, permutation_sample

        tables, pairs = label_tables(store, ctx, "top1"), pair_counts_by_label(store, ctx)
        if tables is None or pairs is None or (self.permutation and self.seed != 0):
            return None
        n_tok, (top1,) = tables
        codes: list[int | None] = list(range(len(n_tok))) if self.by_label else [None]  # code D = unlabelled
        routed, samples = [np.zeros(len(codes), np.int64)] * ctx.meta.n_layers, [None for _ in codes]
        if self.permutation:
            found = permutation_sample(store, ctx, codes, PERM_SAMPLE)
            if found is None:
                return None
            routed, samples = found
        layers = []
        for li in range(ctx.meta.n_layers):
            per_group = []
            for gi, code in enumerate(codes):
                n, (q,) = label_rows(n_tok, [top1[li]], code)
                p = pairs[li].sum(axis=1) if code is None else pairs[li][:, code]
                per_group.append(np.r_[p, routed[li][gi], n, q].astype(np.int64))
            layers.append(per_group)
        return {"counts": layers, "sample": samples}

    def finish(self, partial: dict[str, Any], ctx: Context) -> pd.DataFrame:
        data = ctx.meta
        names: list[str | None] = [*data.label_names, None] if self.by_label else [None]
        rows = []
        for li, layer in enumerate(data.layer_ids):
            E, k = int(data.n_experts[li]), int(data.top_k[li])
            for gi, (name, counts, sample) in enumerate(zip(names, partial["counts"][li], partial["sample"])):
                n_pairs, n_same, n_overlap_pairs, n_overlap, n_pool, n_tok = (int(v) for v in counts[:6])
                if self.by_label and gi == len(names) - 1 and n_tok == 0:
                    continue  # no unlabelled token: no unlabelled row
                q = counts[6:]
                row = {
                    "layer": int(layer),
                    "n_pairs": n_pairs,
                    "first_choice": n_same / n_pairs if n_pairs else np.nan,
                    "n_overlap_pairs": n_overlap_pairs,
                    "any_overlap": n_overlap / n_overlap_pairs if n_overlap_pairs else np.nan,
                    "uniform_first": 1.0 / E,
                    "uniform_overlap": uniform_overlap(E, k),
                    "sum_sq_first": float(((q / q.sum()) ** 2).sum()) if q.sum() else np.nan,
                }
                if self.permutation:
                    row["perm_first"] = _perm_first(q, n_pairs, n_same) if n_pool >= 4 else np.nan
                    row["perm_overlap"] = _overlap_rate(sample, li) if n_pool >= 4 else np.nan
                if self.by_label:
                    row = {"layer": row.pop("layer"), "label": name, **row}
                rows.append(row)
        return result(
            pd.DataFrame(rows), data, "repetition", by_label=self.by_label, seed=self.seed,
            pairs="consecutive tokens of one sequence; with phases pooled the prompt→generation pair is included",
            permutation=f"perm_first exact over all non-neighbour pairs; perm_overlap over all non-neighbour pairs of "
            f"a sample of {PERM_SAMPLE} tokens per group (lowest seeded hash of (seq_id, pos))" if self.permutation else "not computed",
            reference="Mixtral of Experts (arXiv 2401.04088) Table 5",
        )  # fmt: skip


def repetition(
    source: Any, run: int | None = None, *, phase: str | None = None, by_label: bool = False, seed: int = 0,
    permutation: bool = True, **how: Any,
) -> pd.DataFrame:
    """Per layer [, label]: ``first_choice`` = share of consecutive pairs (same sequence) with the same
    rank-0 expert, ``any_overlap`` = share sharing at least one expert, over ``n_pairs`` / ``n_overlap_pairs``
    (a token without a first choice / without any routed expert leaves its pairs out); baselines
    ``uniform_first`` 1/E, ``uniform_overlap``, load-aware ``sum_sq_first`` Σq² (q = first-choice shares of
    the group's tokens) and the permutation rates ``perm_first`` / ``perm_overlap``: the rates expected
    when each token is paired with a uniformly random token of its group that is neither itself nor a
    sequence neighbour — ``perm_first`` exactly (from first-choice counts), ``perm_overlap`` over all such
    pairs among a deterministic sample of `PERM_SAMPLE` tokens per group (lowest hash of (seq_id, pos)
    seeded by ``seed``; every pair of a smaller group), so both are the same for any batch split. NaN for
    groups of fewer than 4 routed tokens. With ``by_label`` a pair belongs to its first token's label.
    ``permutation=False`` leaves both permutation columns out; then a run with derived summaries answers
    from them without a pass over its routing (the permutation baselines always need one).
    Mixtral (arXiv 2401.04088) Table 5
    """
    return compute(RepetitionCounts(by_label, seed, permutation), source, run, phase=phase, **how)


def _groups(data: RoutingData, by_label: bool) -> list[int | None]:
    """Label codes of the groups (every label, then -1 = unlabelled), or one group of every token."""
    return [*range(len(data.label_names)), -1] if by_label else [None]


def _perm_first(q: np.ndarray, n_pairs: int, n_same: int) -> float:
    """P(same first choice) over ordered pairs of distinct tokens with a first choice that are not
    sequence neighbours: (Σ q_e² − N − 2·same neighbours) / (N² − N − 2·neighbour pairs)."""
    n = float(q.sum())
    pairs = n * n - n - 2 * n_pairs
    return float((float((q.astype(np.float64) ** 2).sum()) - n - 2 * n_same) / pairs) if pairs > 0 else float("nan")


def _overlap_rate(sample: Lowest, li: int) -> float:
    """Share of ordered non-neighbour pairs of sampled tokens routed at layer li that share an expert."""
    bits = sample.columns[f"bits{li}"]
    ok = bits.any(axis=1)
    bits, seq, pos = bits[ok], sample.columns["seq"][ok].astype(np.int64), sample.columns["pos"][ok].astype(np.int64)
    far = (seq[:, None] != seq[None, :]) | (np.abs(pos[:, None] - pos[None, :]) > 1)  # not itself, not a neighbour
    share = np.zeros(far.shape, bool)
    for w in range(bits.shape[1]):  # two sets meet when any word of them does
        share |= (bits[:, None, w] & bits[None, :, w]) != 0
    valid = int(far.sum())
    return int((share & far).sum()) / valid if valid else float("nan")
