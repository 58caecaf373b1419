"""SteerMoE risk difference between two behaviours (Fayyaz et al., arXiv 2509.09660).

Why: the experts whose selection rate differs most between paired examples of opposite behaviours are the
candidates to force on or off (steering). Behaviours are two labels of one run, or (for paired runs, e.g.
two prompt sets recorded separately) two runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from moelens.analysis._common import Source, group_expert_counts, resolve, result
from moelens.analysis.data import RoutingData
from moelens.errors import InputError


def _tokens(data: RoutingData, label: str | None) -> np.ndarray:
    if label is None:
        return np.arange(data.n_tokens)
    if label not in data.label_names:
        raise InputError(f"unknown label {label!r}; labels are {list(data.label_names)}")
    return np.flatnonzero(data.label == data.label_names.index(label))


def risk_difference(
    source: Source,
    run: int | None = None,
    *,
    label_a: str | None = None,
    label_b: str | None = None,
    source_b: Any = None,
    run_b: int | None = None,
    phase: str | None = None,
    equalize: bool = False,
) -> pd.DataFrame:
    """Per (layer, expert): a = tokens of a behaviour where the expert is selected, d = where it is not,
    ``risk_diff`` = a1/(a1+d1) − a2/(a2+d2), ``a1_n``/``a2_n`` the two rates, ranked globally by
    ``risk_diff_abs``. Behaviour 1 = ``label_a`` tokens of (source, run); behaviour 2 = ``label_b`` tokens
    of the same run, or of (``source_b`` or source, ``run_b``) when given (None = all tokens).
    ``equalize`` truncates both to the same number of tokens (SteerMoE's "eq" option, first tokens kept).
    SteerMoE ``custom_steering.ipynb``."""
    a = resolve(source, run, phase=phase)
    paired_runs = run_b is not None or source_b is not None
    b = resolve(source_b if source_b is not None else source, run_b, phase=phase) if paired_runs else a
    if not paired_runs and (label_a is None or label_b is None):
        raise InputError("give label_a and label_b (two behaviours of one run), or run_b/source_b for a second run")
    ta, tb = _tokens(a, label_a), _tokens(b, label_b)
    if equalize:
        n = min(len(ta), len(tb))
        ta, tb = ta[:n], tb[:n]
    frames = []
    for layer in np.intersect1d(a.layer_ids, b.layer_ids):
        la, lb = a.layer_index(int(layer)), b.layer_index(int(layer))
        E = int(a.n_experts[la])
        if E != int(b.n_experts[lb]):
            raise InputError(f"layer {layer}: the runs have different numbers of experts")
        a1 = group_expert_counts(a.experts[la, ta], E)[0]
        a2 = group_expert_counts(b.experts[lb, tb], E)[0]
        with np.errstate(invalid="ignore", divide="ignore"):
            rate1, rate2 = a1 / len(ta), a2 / len(tb)
        frames.append(
            pd.DataFrame(
                {"layer": int(layer), "expert": np.arange(E), "a1": a1, "a2": a2, "d1": len(ta) - a1,
                 "d2": len(tb) - a2, "a1_n": rate1, "a2_n": rate2, "risk_diff": rate1 - rate2,
                 "risk_diff_abs": np.abs(rate1 - rate2)}
            )
        )  # fmt: skip
    columns = ["layer", "expert", "a1", "a2", "d1", "d2", "a1_n", "a2_n", "risk_diff", "risk_diff_abs"]
    df = pd.concat(frames) if frames else pd.DataFrame(columns=columns)
    df = df.sort_values(["risk_diff_abs", "layer", "expert"], ascending=[False, True, True], na_position="last")
    return result(
        df, a, "risk_difference", label_a=label_a, label_b=label_b,
        run_b=None if not paired_runs or b.origin is None else b.origin.run_id, equalize=equalize,
        n_tokens_a=len(ta), n_tokens_b=len(tb),
        reference="SteerMoE (arXiv 2509.09660) custom_steering.ipynb",
    )  # fmt: skip
