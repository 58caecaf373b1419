"""How many experts each token used: mean and distribution per layer, by label or by position.

Under fixed top-k routing every token uses k experts (fewer only after capacity drops or weight-0 slots); under
dynamic routing (top-p, Huang et al. 2024, "Harder Tasks Need More Experts", arXiv:2403.07652) the count varies
per token, and the paper's claims are about that variation: harder inputs (labels, later positions, lower layers)
take more experts. The mean is also the compute a routing strategy spends, in expert calls per token and layer.

Written as map (per-batch counts of tokens per (layer, group, n_experts)) -> merge (add) -> finish, so a run streams
through in batches of whole sequences (`ExpertsPerToken`, bounded memory) and combines exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import Source, result
from moelens.analysis.chunked import Chunked, Context, compute
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

BY = ("layer", "label", "position")


def experts_per_token_map(data: RoutingData, *, by: str = "layer") -> dict:
    """Counts ``[L, G, K + 1]`` of tokens with n routed experts (n = 0..K) per layer and group."""
    if by not in BY:
        raise InputError(f"by must be one of {BY}, not {by!r}")
    if by == "label":
        group = np.where(data.label >= 0, data.label, len(data.label_names)).astype(np.int64)
        n_groups = len(data.label_names) + 1
    elif by == "position":
        group = data.pos.astype(np.int64)
        n_groups = int(group.max(initial=-1)) + 1
    else:
        group, n_groups = np.zeros(data.n_tokens, np.int64), 1
    K = data.experts.shape[2] if data.experts.ndim == 3 else 0
    counts = np.zeros((len(data.layer_ids), n_groups, K + 1), np.int64)
    for li in range(len(data.layer_ids)):
        n_routed = (data.experts[li] >= 0).sum(axis=1)
        np.add.at(counts[li], (group, n_routed), 1)
    return {"by": by, "counts": counts, "layer_ids": np.asarray(data.layer_ids), "label_names": tuple(data.label_names)}


def experts_per_token_merge(a: dict, b: dict) -> dict:
    """The state of two batches together (counts add; groups and widths padded to the larger)."""
    if a["by"] != b["by"] or not np.array_equal(a["layer_ids"], b["layer_ids"]) or a["label_names"] != b["label_names"]:
        raise InputError("cannot merge experts_per_token states of different runs or groupings")
    shape = np.maximum(a["counts"].shape, b["counts"].shape)
    counts = np.zeros(shape, np.int64)
    for part in (a["counts"], b["counts"]):
        counts[: part.shape[0], : part.shape[1], : part.shape[2]] += part
    return {**a, "counts": counts}


def experts_per_token_finish(state: dict) -> pd.DataFrame:
    """Rows per (layer, group, n_experts) with ``count``, ``share`` of the group's tokens, and the group's
    ``n_tokens``, ``mean_experts`` and ``std_experts`` (repeated on each of its rows)."""
    counts, by = state["counts"], state["by"]
    n = np.arange(counts.shape[2])
    n_tokens = counts.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (counts * n).sum(axis=2) / n_tokens
        std = np.sqrt(np.maximum((counts * n**2).sum(axis=2) / n_tokens - mean**2, 0.0))
        share = counts / n_tokens[..., None]
    li, gi, ni = np.nonzero(counts)
    frame = pd.DataFrame({
        "layer": state["layer_ids"][li].astype(np.int64),
        "n_experts": ni.astype(np.int64),
        "count": counts[li, gi, ni],
        "share": share[li, gi, ni],
        "n_tokens": n_tokens[li, gi],
        "mean_experts": mean[li, gi],
        "std_experts": std[li, gi],
    })
    if by == "label":
        names = np.array([*state["label_names"], None], dtype=object)
        frame.insert(1, "label", names[gi])
    elif by == "position":
        frame.insert(1, "pos", gi.astype(np.int64))
    return frame.sort_values([c for c in ("layer", "label", "pos", "n_experts") if c in frame], kind="stable")


@dataclass(frozen=True)
class ExpertsPerToken(Chunked):
    """`experts_per_token_map` / `_merge` / `_finish` as a streamed score."""

    by: str = "layer"

    def map(self, batch: RoutingData) -> dict:
        return experts_per_token_map(batch, by=self.by)

    def merge(self, a: dict, b: dict) -> dict:
        return experts_per_token_merge(a, b)

    def finish(self, partial: dict, ctx: Context) -> pd.DataFrame:
        return result(experts_per_token_finish(partial), ctx.meta, "experts_per_token", by=self.by,
                      reference="Huang et al. 2024, arXiv:2403.07652")


def experts_per_token(source: Source, run: int | None = None, *, phase: str | None = None,
                      by: str = "layer", **how: Any) -> pd.DataFrame:
    """Distribution and mean of the number of routed experts per token, per layer (and label or position).

    A slot counts when it was routed (not padding of a top-p routing, not capacity-dropped, not weight 0).
    Streamed over the run in batches of whole sequences.
    """
    if by not in BY:
        raise InputError(f"by must be one of {BY}, not {by!r}")
    return compute(ExpertsPerToken(by), source, run, phase=phase, **how)
