"""SRP — Segment Routing best Performance (moe-lrc, arXiv 2505.16056).

SRP asks how well one fixed expert set per window of m consecutive tokens could predict the real per-token
routing (best F1 over a count threshold θ): high SRP means routing is locally consistent, which is what
expert offloading and caching need.

Differences from the reference code, on purpose: any m ≤ T is allowed (the reference's
doubling loop is bounded by the number of sequences and silently skips m, and outputs nothing for one
sequence); expert ids are not limited to int8; the model's recorded choice is used, not a top-k
recomputed from bf16 logits. Intervals over sequences (the paper's bootstrap, arXiv 2505.16056): `moelens.analysis.bootstrap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import result
from moelens.analysis.chunked import Chunked, Context, compute
from moelens.analysis._kernels import jit, parallel_map, window_histograms
from moelens.analysis.data import RoutingData
from moelens.errors import InputError

LEVELS = ("expert", "layer", "model")


def f1_curve(hist: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From window-count histograms ``[..., m+1]`` (hist[v] = number of (window, expert) cells with count
    v): TP(θ), Pred(θ) for θ = 0..m and Act."""
    v = np.arange(m + 1)
    tp = np.cumsum((hist * v)[..., ::-1], axis=-1)[..., ::-1]
    pred = m * np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]
    return tp, pred, tp[..., 0]


def srp_from_hist(hist: np.ndarray, m: int) -> dict[str, np.ndarray]:
    """SRP = max_θ F1(θ), θ* (smallest maximiser), ρ̂ = Pred(θ*)/Act, act_rate = Act/Pred(0), F1 at θ = 0;
    NaN where there is no window."""
    tp, pred, act = f1_curve(hist.astype(np.float64), m)
    f1 = 2 * tp / np.maximum(pred + act[..., None], 1)
    theta = f1.argmax(axis=-1)
    best = np.take_along_axis(f1, theta[..., None], axis=-1)[..., 0]
    pred_best = np.take_along_axis(pred, theta[..., None], axis=-1)[..., 0]
    empty = pred[..., 0] == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "srp": np.where(empty, np.nan, best),
            "theta": np.where(empty, -1, theta),
            "rho": np.where(empty, np.nan, np.where(act > 0, pred_best / np.maximum(act, 1), 0.0)),
            "act_rate": np.where(empty, np.nan, act / pred[..., 0]),
            "f1_theta0": np.where(empty, np.nan, f1[..., 0]),
        }


@dataclass(frozen=True)
class SrpHistograms(Chunked):
    """Per (m, layer) ``[G, E, m+1]`` window-count histograms, and per group the windows per m and tokens."""

    segment_lengths: tuple[int, ...] = (4, 16, 64, 256)
    level: str = "layer"
    by_label: bool = False

    def map(self, batch: RoutingData) -> dict[str, Any]:
        names, seg_group = _segment_groups(batch, self.by_label)
        G = len(names)
        begin, end = batch.segment_starts[:-1], batch.segment_starts[1:]
        seg_len = end - begin
        calls = [(batch.experts[li], begin, end, seg_group, G, int(batch.n_experts[li]), m) for m in self.segment_lengths for li in range(batch.n_layers)]
        return {
            "hist": parallel_map(jit(window_histograms), calls),
            "n_win": [np.bincount(seg_group, weights=np.maximum(seg_len - m + 1, 0), minlength=G).astype(np.int64) for m in self.segment_lengths],
            "tokens": np.bincount(seg_group, weights=seg_len, minlength=G).astype(np.int64),
        }  # fmt: skip

    def finish(self, partial: dict[str, Any], ctx: Context) -> pd.DataFrame:
        data, L = ctx.meta, ctx.meta.n_layers
        names: list[str | None] = [*data.label_names, None] if self.by_label else [None]
        frames = []
        for i, m in enumerate(self.segment_lengths):
            hists = partial["hist"][i * L : (i + 1) * L]
            frames.extend(_frames(data, hists, names, partial["n_win"][i], partial["tokens"] > 0, m, self.level))
        df = pd.concat(frames) if frames else pd.DataFrame(columns=["m", "srp", "theta", "rho", "act_rate", "f1_theta0", "n_windows"])
        if not self.by_label:
            df = df.drop(columns="label")
        return result(
            df, data, "srp", segment_lengths=list(self.segment_lengths), level=self.level, by_label=self.by_label,
            bootstrap_ci="none here: moelens.analysis.bootstrap.bootstrap('srp', ...) adds srp_lo/_hi", windows="every stride-1 window of m tokens inside one sequence",
            reference="moe-lrc (arXiv 2505.16056) src/30_srp_calc.py, 31_srp_refine.py",
        )  # fmt: skip


def srp(
    source: Any,
    run: int | None = None,
    *,
    segment_lengths: Sequence[int] = (4, 16, 64, 256),
    phase: str | None = None,
    level: str = "layer",
    by_label: bool = False,
    **how: Any,
) -> pd.DataFrame:
    """SRP for every segment length m, with micro aggregation: the per-θ counts are summed over the group
    first and θ is chosen once per group — per ``expert``, per ``layer`` (the paper's ``lg``/``ld``) or over
    the whole ``model`` (``mg``/``md``); ``by_label`` keeps labels apart (the ``d`` suffix).
    Columns [layer] [expert] [label] m, srp, theta (θ*, -1 without windows), rho (ρ̂), act_rate, f1_theta0
    (the θ = 0 baseline 2r/(1+r) at the data's activation rate r), n_windows. Windows are every stride-1
    run of m tokens inside one sequence (a phase filter splits a sequence into its prompt and generated
    parts); a group with no window of length m gets NaN. moe-lrc ``30_srp_calc.py``/``31_srp_refine.py``"""
    if level not in LEVELS:
        raise InputError(f"level must be one of {LEVELS}, not {level!r}")
    ms = tuple(int(m) for m in segment_lengths)
    if any(m < 1 for m in ms):
        raise InputError(f"segment lengths must be >= 1, got {list(ms)}")
    return compute(SrpHistograms(ms, level, by_label), source, run, phase=phase, **how)


def _segment_groups(data: RoutingData, by_label: bool) -> tuple[list[str | None], np.ndarray]:
    """Group names and the group of every segment (its first token's label; unlabelled last)."""
    n_seg = len(data.segment_starts) - 1
    if not by_label:
        return [None], np.zeros(n_seg, np.int64)
    names: list[str | None] = [*data.label_names, None]
    label = data.label[data.segment_starts[:-1]]
    return names, np.where(label >= 0, label, len(names) - 1).astype(np.int64)


def _frames(
    data: RoutingData, hists: list[np.ndarray], names: list[str | None], n_win: np.ndarray, present: np.ndarray, m: int, level: str
) -> list[pd.DataFrame]:
    """Aggregate the per-layer ``[G, E, m+1]`` histograms at ``level`` into result rows (groups without
    tokens left out)."""
    G = len(names)
    def block(hist: np.ndarray, keys: dict[str, np.ndarray]) -> pd.DataFrame:
        X = hist.shape[1]
        stats = {k: v.ravel() for k, v in srp_from_hist(hist, m).items()}
        df = pd.DataFrame(
            {**{k: np.tile(v, G) for k, v in keys.items()}, "label": np.repeat(np.array(names, dtype=object), X),
             "m": m, **stats, "n_windows": np.repeat(n_win, X)}
        )  # fmt: skip
        return df[np.repeat(present, X)]

    if level == "model":
        return [block(sum(h.sum(axis=1) for h in hists)[:, None, :], {})] if hists else []
    if level == "layer":
        return [block(h.sum(axis=1)[:, None, :], {"layer": data.layer_ids[li : li + 1]}) for li, h in enumerate(hists)]
    return [
        block(h, {"layer": np.full(h.shape[1], data.layer_ids[li]), "expert": np.arange(h.shape[1])}) for li, h in enumerate(hists)
    ]
