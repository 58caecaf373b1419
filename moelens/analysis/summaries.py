"""Derived summaries: the partial statistics of the simple scores, computed in one streamed pass over a
completed run and stored as tables, so pages and scores can finish without reading ``routing`` again.

Why these: they are exactly what the count-based scores merge (expert load, balance, domain
specialization, co-activation, transitions, vocabulary), broken down by phase (and label where a score
groups by it) so that every phase filter is a sum over rows. They can always be rebuilt from ``routing``
(``moelens summarize RUN``). Tables (one row per non-zero cell; ``phase`` NULL = unknown, for pairs: the
two tokens' phases differ; ``label`` NULL = unlabelled):

* ``expert_counts``: layer, expert, label, phase, count (routed slots), top1 (first choices), gate_mass;
* ``tokens``: label, phase, n_tokens;
* ``coactivation``: layer, phase, expert_i < expert_j, n_ij (tokens routed to both);
* ``transitions``: layer, next_layer (the next MoE layer), phase, expert, next_expert, top1 (first choice →
  first choice), all_slots (every slot pair);
* ``token_experts``: layer, phase, token_id, expert, count, first_at (``seq_id << 35 | pos << 7 | rank``
  of the first such slot);
* ``token_ids``: phase, token_id, n (positions);
* ``repetition``: layer, label, phase, n_pairs, same_first, n_overlap_pairs, overlap (consecutive pairs);
* ``committee_units``: layer, label, phase (always prompt), expert, n_units, count, gate_mass, gate_max,
  gate_min — the CommitteeAudit statistics over each labelled sequence's last prompt token, every expert of
  every label with units (``gate_max`` 0 / ``gate_min`` +inf where never selected);
* ``routed_tokens``: layer, label, phase, n (tokens with at least one routed expert at that layer);
* ``permutation_sample``: label, phase, seq_id, pos, bits — per (label, phase) cell the `PERM_SAMPLE` tokens
  with the lowest seed-0 hash of (seq_id, pos), each with its routed-expert bitsets of every layer
  (``bits``: layers × words uint64, words = ⌈max E / 64⌉). The lowest hashes of a union of cells are the lowest
  of their samples, so repetition's permutation baseline of any phase filter and label grouping is a merge.

This module writes them; scores read them back as partials through `moelens.analysis.summary_partials`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from moelens.analysis._common import consecutive_pairs, group_expert_counts
from moelens.analysis._sets import bitsets, intersection_size
from moelens.analysis.chunked import Chunked, Context, High, Keyed, Low, Lowest, compute_partial, position_hash, position_order
from moelens.analysis.coactivation import grouped_pair_counts
from moelens.analysis.committee import eci_stats, unit_tokens
from moelens.analysis.data import PHASES, RoutingData
from moelens.analysis.repetition import PERM_SAMPLE, first_choice_repeats
from moelens.analysis.vocabulary import order_key, token_expert_table

NAMES = ("expert_counts", "tokens", "coactivation", "transitions", "token_experts", "token_ids", "repetition", "committee_units",
         "routed_tokens", "permutation_sample")

#: Phase codes in the summaries' arrays: index = PHASES code + 1 (0 = unknown).
_P = len(PHASES) + 1


@dataclass(frozen=True)
class RunSummary(Chunked):
    """All summaries of a run as one mergeable partial (dense per-layer arrays, `Keyed` per token id)."""

    def map(self, batch: RoutingData) -> dict[str, Any]:
        D = len(batch.label_names)
        G = D + 1
        label = np.where(batch.label >= 0, batch.label, D).astype(np.int64)
        phase = batch.phase.astype(np.int64) + 1
        cell = label * _P + phase
        pairs = consecutive_pairs(batch)
        pair_phase = np.where(phase[pairs] == phase[pairs + 1], phase[pairs], 0)
        tok = batch.token_id.astype(np.int64)
        out: dict[str, Any] = {
            "tokens": np.bincount(cell, minlength=G * _P),
            "token_ids": Keyed((tok * _P + phase)[tok >= 0], {"n": np.ones(int((tok >= 0).sum()), np.int64)}, {"n": "sum"}),
            "count": [], "top1": [], "mass": [], "pairs": [], "transitions": [], "token_experts": [], "repetition": [],
            "committee_units": [], "routed": [],
        }  # fmt: skip
        hashed, place = position_hash(batch.seq_id, batch.pos, 0), position_order(batch.seq_id, batch.pos)
        sampled = [rows[np.lexsort((place[rows], hashed[rows]))[:PERM_SAMPLE]] for rows in (np.flatnonzero(cell == c) for c in range(G * _P))]
        at = np.concatenate(sampled)  # each cell's candidates for the permutation sample: the loop keeps their bitsets
        sets = np.zeros((len(at), batch.n_layers, max(1, -(-int(batch.n_experts.max(initial=1)) // 64))), np.uint64)
        units = unit_tokens(batch, "last_prompt_token")
        order = order_key(batch, np.arange(batch.n_tokens))
        known = np.flatnonzero(tok >= 0)
        cell_ids, cell_code = np.unique((tok * _P + phase)[known], return_inverse=True)  # (token id, phase) cells
        for li, E in enumerate(batch.n_experts):
            E = int(E)
            exp = batch.experts[li]
            out["count"].append(group_expert_counts(exp, E, cell, G * _P))
            out["top1"].append(group_expert_counts(exp[:, :1], E, cell, G * _P))
            out["mass"].append(group_expert_counts(exp, E, cell, G * _P, weights=batch.weights[li]))
            out["pairs"].append(grouped_pair_counts(exp, E, phase, _P))
            if li + 1 < batch.n_layers:
                out["transitions"].append(_phase_transitions(exp, batch.experts[li + 1], phase, E, int(batch.n_experts[li + 1])))
            out["token_experts"].append(token_expert_table(exp[known], E, cell_ids, cell_code, order[known]))
            bits = bitsets(exp, E)
            sets[:, li, : bits.shape[1]] = bits[at]
            has_any = bits.any(axis=1)
            out["routed"].append(np.bincount(cell[has_any], minlength=G * _P))
            valid, same = first_choice_repeats(batch, li, pairs)
            overlap_ok = has_any[pairs] & has_any[pairs + 1]
            overlap = intersection_size(bits[pairs], bits[pairs + 1]) > 0
            pair_cell = label[pairs] * _P + pair_phase
            out["repetition"].append(np.stack([np.bincount(pair_cell, weights=w, minlength=G * _P).astype(np.int64) for w in (valid, same, overlap_ok, overlap)]))
            n, selected, unit_mass, top, low = eci_stats(exp[units], batch.weights[li, units], batch.label[units], D, E)
            out["committee_units"].append((n, selected, unit_mass, High(top), Low(low)))
        bounds = np.cumsum([0, *map(len, sampled)])
        out["permutation_sample"] = [
            Lowest(hashed[rows], place[rows], {"seq": batch.seq_id[rows], "pos": batch.pos[rows], "bits": sets[a:b]}, PERM_SAMPLE)
            for rows, a, b in zip(sampled, bounds[:-1], bounds[1:])
        ]
        return out

    def finish(self, partial: dict[str, Any], ctx: Context) -> dict[str, pa.Table]:
        return _tables(partial, ctx.meta)


def _phase_transitions(here: np.ndarray, there: np.ndarray, phase: np.ndarray, E: int, E2: int) -> np.ndarray:
    """``[P, 2, E, E2]`` transitions from layer ``here`` to the next, per phase cell: first choice → first
    choice, and every slot pair (what `moelens.analysis.transitions.transition_counts` counts), in one
    compiled pass each."""
    from moelens.analysis._kernels import cross_slot_counts, jit

    out = np.zeros((_P, 2, E, E2), np.int64)
    for i, k in enumerate((1, here.shape[1])):
        counts = np.zeros((_P, E, E2), np.int64)
        if jit(cross_slot_counts)(here, there, phase, min(k, here.shape[1]), min(k, there.shape[1]), counts):
            raise ValueError(f"expert ids >= n_experts ({E}, {E2}) in a layer pair")
        out[:, i] = counts
    return out


def summarize(store: Any, run: int, *, persist: bool = True, **how: Any) -> dict[str, pa.Table]:
    """Every derived summary of ``run`` from one streamed pass over its routing, as Arrow tables by name
    (see the module docstring); with ``persist`` each is written through ``store.write_summary`` (replacing
    the run's previous rows). ``how``: engine options of `moelens.analysis.chunked.compute`."""
    chunked = RunSummary()
    partial, ctx = compute_partial(chunked, store, run, **how)
    tables = chunked.finish(partial, ctx)
    if persist:
        for name, table in tables.items():
            store.write_summary(int(run), name, table)
    return tables


def _tables(partial: dict[str, Any], data: RoutingData) -> dict[str, pa.Table]:
    D = len(data.label_names)
    labels = np.array([*data.label_names, None], dtype=object)
    phases = np.array([None, *PHASES], dtype=object)
    cells = np.arange((D + 1) * _P)

    def cols(**columns: Any) -> pa.Table:
        return pa.table({k: pa.array(v.tolist() if isinstance(v, np.ndarray) and v.dtype == object else v) for k, v in columns.items()})

    out: dict[str, pa.Table] = {}
    n_tok = partial["tokens"]
    keep = n_tok > 0
    out["tokens"] = cols(label=labels[cells[keep] // _P], phase=phases[cells[keep] % _P], n_tokens=n_tok[keep].astype(np.int64))
    frames: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in ("expert_counts", "coactivation", "transitions", "token_experts", "repetition",
                                                                          "committee_units", "routed_tokens")}
    for li, layer in enumerate(data.layer_ids):
        E = int(data.n_experts[li])
        count, top1, mass = partial["count"][li], partial["top1"][li], partial["mass"][li]
        c, e = np.nonzero(count)
        frames["expert_counts"].append(
            dict(layer=np.full(len(c), layer, np.int16), expert=e.astype(np.int16), label=labels[c // _P], phase=phases[c % _P],
                 count=count[c, e].astype(np.int64), top1=top1[c, e].astype(np.int64), gate_mass=mass[c, e])
        )  # fmt: skip
        pairs = np.triu(partial["pairs"][li], 1)  # symmetric: keep i < j
        p, i, j = np.nonzero(pairs)
        frames["coactivation"].append(dict(layer=np.full(len(p), layer, np.int16), phase=phases[p], expert_i=i.astype(np.int16), expert_j=j.astype(np.int16), n_ij=pairs[p, i, j].astype(np.int64)))
        if li + 1 < data.n_layers:
            trans = partial["transitions"][li]  # [P, 2, E, E2]
            p, a, b = np.nonzero(trans[:, 1])  # every first-choice pair is also a slot pair
            frames["transitions"].append(
                dict(layer=np.full(len(p), layer, np.int16), next_layer=np.full(len(p), data.layer_ids[li + 1], np.int16), phase=phases[p],
                     expert=a.astype(np.int16), next_expert=b.astype(np.int16), top1=trans[p, 0, a, b].astype(np.int64), all_slots=trans[p, 1, a, b].astype(np.int64))
            )  # fmt: skip
        keys, values = partial["token_experts"][li].table()
        frames["token_experts"].append(
            dict(layer=np.full(len(keys), layer, np.int16), phase=phases[(keys // E) % _P], token_id=(keys // E // _P).astype(np.int32),
                 expert=(keys % E).astype(np.int16), count=values["count"], first_at=values["first"])
        )  # fmt: skip
        rep = partial["repetition"][li]
        c = np.flatnonzero(rep.sum(axis=0))
        frames["repetition"].append(
            dict(layer=np.full(len(c), layer, np.int16), label=labels[c // _P], phase=phases[c % _P], n_pairs=rep[0, c], same_first=rep[1, c],
                 n_overlap_pairs=rep[2, c], overlap=rep[3, c])
        )  # fmt: skip
        n, selected, unit_mass, top, low = partial["committee_units"][li]
        d = np.repeat(np.flatnonzero(n), E)
        e = np.tile(np.arange(E), len(np.flatnonzero(n)))
        frames["committee_units"].append(
            dict(layer=np.full(len(d), layer, np.int16), label=labels[d], phase=np.full(len(d), "prompt", dtype=object), expert=e.astype(np.int16),
                 n_units=n[d].astype(np.int64), count=selected[d, e].astype(np.int64), gate_mass=unit_mass[d, e].astype(np.float64),
                 gate_max=top.value[d, e].astype(np.float64), gate_min=low.value[d, e].astype(np.float64))
        )  # fmt: skip
        routed = partial["routed"][li]
        c = np.flatnonzero(routed)
        frames["routed_tokens"].append(dict(layer=np.full(len(c), layer, np.int16), label=labels[c // _P], phase=phases[c % _P],
                                            n=routed[c].astype(np.int64)))  # fmt: skip
    for name, parts in frames.items():
        out[name] = pa.concat_tables([cols(**part) for part in parts]) if parts else pa.table({})
    samples = [(c, sample) for c, sample in enumerate(partial["permutation_sample"]) if len(sample.key)]
    bits = [sample.columns["bits"].reshape(len(sample.key), -1) for _, sample in samples]
    flat = np.concatenate(bits) if bits else np.zeros((0, 1), np.uint64)
    out["permutation_sample"] = pa.table({
        "label": pa.array([labels[c // _P] for c, sample in samples for _ in sample.key], pa.string()),
        "phase": pa.array([phases[c % _P] for c, sample in samples for _ in sample.key], pa.string()),
        "seq_id": np.concatenate([s.columns["seq"] for _, s in samples]).astype(np.int32) if samples else np.zeros(0, np.int32),
        "pos": np.concatenate([s.columns["pos"] for _, s in samples]).astype(np.int32) if samples else np.zeros(0, np.int32),
        "bits": pa.ListArray.from_arrays(np.arange(len(flat) + 1, dtype=np.int32) * flat.shape[1], pa.array(flat.ravel(), pa.uint64())),
    })  # fmt: skip
    ids, n = partial["token_ids"].table()
    out["token_ids"] = cols(phase=phases[ids % _P], token_id=(ids // _P).astype(np.int32), n=n["n"])
    return {name: out[name] for name in NAMES}
