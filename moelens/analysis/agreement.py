"""Run-vs-run routing agreement — OLMoE router saturation generalised.

The same formula compares a checkpoint with the final model (saturation), a steered run with its baseline,
bf16 with fp32, or two seeds. Tokens are aligned by (seq_id, pos) and must carry the same token id; per
sequence only the shared prefix counts (after the first differing token the contexts differ, so later
coincidental matches are not comparable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import result
from moelens.analysis._kernels import jit, shared_experts
from moelens.analysis.chunked import Chunked, Context, compute
from moelens.analysis.data import RoutingData
from moelens.errors import InputError


@dataclass(frozen=True)
class AgreementCounts(Chunked):
    """For (batch of run a, the same sequences of run b): per shared layer id the aligned tokens, tokens with
    a first choice in both, equal first choices and Σ |S_a ∩ S_b| (integers, merged exactly)."""

    run_b: int | None = None  #: for the result's params
    paired = True

    def map(self, pair: tuple[RoutingData, RoutingData]) -> dict[int, np.ndarray]:
        a, b = pair
        ia, ib = _aligned_prefix(a, b)
        out = {}
        for layer in np.intersect1d(a.layer_ids, b.layer_ids):
            la, lb = a.layer_index(int(layer)), b.layer_index(int(layer))
            E = int(a.n_experts[la])
            if E != int(b.n_experts[lb]):
                raise InputError(f"layer {layer}: the runs have different numbers of experts ({E} vs {int(b.n_experts[lb])})")
            ea, eb = a.experts[la, ia], b.experts[lb, ib]
            first_ok = (ea[:, 0] >= 0) & (eb[:, 0] >= 0) if len(ia) else np.zeros(0, bool)
            if max(int(ea.max(initial=-1)), int(eb.max(initial=-1))) >= E:
                raise InputError(f"layer {layer}: expert ids >= n_experts ({E})")
            shared = jit(shared_experts)(ea, eb, E)
            k = int(min(a.top_k[la], b.top_k[lb]))
            same = int((ea[first_ok, 0] == eb[first_ok, 0]).sum()) if len(ia) else 0
            out[int(layer)] = np.array([len(ia), first_ok.sum(), same, shared, k, E], np.int64)
        return out

    def merge(self, x: dict[int, np.ndarray], y: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        return {layer: np.r_[x[layer][:4] + y[layer][:4], x[layer][4:]] for layer in x}

    def finish(self, partial: dict[int, np.ndarray], ctx: Context) -> pd.DataFrame:
        rows = []
        for layer, (n, n_first, same, shared, k, E) in sorted(partial.items()):
            rows.append(
                {"layer": layer, "n_tokens": int(n), "top1_agreement": same / n_first if n_first else np.nan,
                 "topk_overlap": shared / k / n if n else np.nan, "k": int(k), "baseline": k / E}
            )  # fmt: skip
        columns = ["layer", "n_tokens", "top1_agreement", "topk_overlap", "k", "baseline"]
        return result(
            pd.DataFrame(rows, columns=columns), ctx.meta, "run_agreement", run_b=self.run_b,
            k_note="divided by min(k_a, k_b) when the runs' k differ",
            alignment="same (seq_id, pos) and token id, shared prefix of each sequence",
            reference="OLMoE (arXiv 2409.02060) §5 router saturation, scripts/run_moe_analysis.py do_ckpt_analysis",
        )  # fmt: skip


def run_agreement(
    source_a: Any,
    run_a: int | None = None,
    source_b: Any = None,
    run_b: int | None = None,
    *,
    phase: str | None = None,
    **how: Any,
) -> pd.DataFrame:
    """Per layer present in both runs: ``n_tokens`` aligned, ``top1_agreement`` (same first choice, over
    tokens with a first choice in both), ``topk_overlap`` = mean |S_a ∩ S_b| / min(k_a, k_b) (weight-0 and
    dropped slots excluded from both sets; divided by the smaller k if they differ) and the uniform
    ``baseline`` k/E. Call as ``run_agreement(store, run_a, run_b)``, ``run_agreement(store_a, run_a,
    store_b, run_b)`` or ``run_agreement(data_a, None, data_b)``. Both runs stream together: each batch of
    run a's sequences is read with the same seq_id range of run b. OLMoE ``do_ckpt_analysis``.
    """
    if isinstance(source_b, (int, np.integer)) and run_b is None:
        source_b, run_b = source_a, int(source_b)  # run_agreement(store, run_a, run_b)
    if source_b is None:
        raise InputError("give the second run: run_agreement(store, run_a, run_b) or (source_a, run_a, source_b, run_b)")
    named_b = None if isinstance(source_b, RoutingData) else run_b
    return compute(AgreementCounts(named_b), source_a, run_a, phase=phase, source_b=source_b, run_b=run_b, **how)


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
