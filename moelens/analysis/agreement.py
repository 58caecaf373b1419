"""Run-vs-run routing agreement — OLMoE router saturation generalised.

The same formula compares a checkpoint with the final model (saturation), a steered run with its baseline,
bf16 with fp32, or two seeds. Tokens are aligned by (seq_id, pos) and must carry the same token id; per
sequence only the shared prefix counts (after the first differing token the contexts differ, so later
coincidental matches are not comparable).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import Source, resolve, result
from moelens.analysis._sets import bitsets, intersection_size
from moelens.analysis.data import RoutingData
from moelens.errors import InputError


def run_agreement(
    source_a: Source,
    run_a: int | None = None,
    source_b: Any = None,
    run_b: int | None = None,
    *,
    phase: str | None = None,
) -> pd.DataFrame:
    """Per layer present in both runs: ``n_tokens`` aligned, ``top1_agreement`` (same first choice, over
    tokens with a first choice in both), ``topk_overlap`` = mean |S_a ∩ S_b| / min(k_a, k_b) (weight-0 and
    dropped slots excluded from both sets; divided by the smaller k if they differ) and the uniform
    ``baseline`` k/E. Call as ``run_agreement(store, run_a, run_b)``, ``run_agreement(store_a, run_a,
    store_b, run_b)`` or ``run_agreement(data_a, None, data_b)``. OLMoE ``do_ckpt_analysis``.
    """
    if isinstance(source_b, (int, np.integer)) and run_b is None:
        source_b, run_b = source_a, int(source_b)  # run_agreement(store, run_a, run_b)
    if source_b is None:
        raise InputError("give the second run: run_agreement(store, run_a, run_b) or (source_a, run_a, source_b, run_b)")
    a = resolve(source_a, run_a, phase=phase)
    b = resolve(source_b, run_b, phase=phase)
    ia, ib = _aligned_prefix(a, b)
    rows = []
    for layer in np.intersect1d(a.layer_ids, b.layer_ids):
        la, lb = a.layer_index(int(layer)), b.layer_index(int(layer))
        E = int(a.n_experts[la])
        if E != int(b.n_experts[lb]):
            raise InputError(f"layer {layer}: the runs have different numbers of experts ({E} vs {int(b.n_experts[lb])})")
        k = int(min(a.top_k[la], b.top_k[lb]))
        ea, eb = a.experts[la, ia], b.experts[lb, ib]
        first_ok = (ea[:, 0] >= 0) & (eb[:, 0] >= 0)
        overlap = intersection_size(bitsets(ea, E), bitsets(eb, E)) / k
        rows.append(
            {
                "layer": int(layer),
                "n_tokens": len(ia),
                "top1_agreement": float((ea[first_ok, 0] == eb[first_ok, 0]).mean()) if first_ok.any() else np.nan,
                "topk_overlap": float(overlap.mean()) if len(ia) else np.nan,
                "k": k,
                "baseline": k / E,
            }
        )
    columns = ["layer", "n_tokens", "top1_agreement", "topk_overlap", "k", "baseline"]
    return result(
        pd.DataFrame(rows, columns=columns), a, "run_agreement",
        run_b=None if b.origin is None else b.origin.run_id,
        k_note="divided by min(k_a, k_b) when the runs' k differ",
        alignment="same (seq_id, pos) and token id, shared prefix of each sequence",
        reference="OLMoE (arXiv 2409.02060) §5 router saturation, scripts/run_moe_analysis.py do_ckpt_analysis",
    )  # fmt: skip


def _aligned_prefix(a: RoutingData, b: RoutingData) -> tuple[np.ndarray, np.ndarray]:
    """Token indices in a and b of the positions both have, up to each sequence's first differing token."""
    key_a = a.seq_id.astype(np.int64) * 2**32 + a.pos
    key_b = b.seq_id.astype(np.int64) * 2**32 + b.pos
    _, ia, ib = np.intersect1d(key_a, key_b, assume_unique=True, return_indices=True)
    if not len(ia):
        return ia, ib
    differs = a.token_id[ia] != b.token_id[ib]
    seq = a.seq_id[ia]
    starts = np.r_[0, np.flatnonzero(np.diff(seq)) + 1]
    bad_before = np.cumsum(differs) - differs  # differing tokens strictly before, from the run start
    bad_before -= np.repeat(bad_before[starts], np.diff(np.r_[starts, len(seq)]))
    keep = ~differs & (bad_before == 0)
    return ia[keep], ib[keep]
