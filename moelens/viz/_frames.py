"""Small helpers shared by the figure builders and the findings: column lookup, names, formatting."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def pick(df: pd.DataFrame, candidates: Sequence[str], what: str, *, required: bool = True) -> str | None:
    """The first of ``candidates`` that is a column of ``df``; a clear error (or None) otherwise."""
    for c in candidates:
        if c in df.columns:
            return c
    if required:
        raise ValueError(f"expected a {what} column (one of {list(candidates)}); got columns {list(df.columns)}")
    return None


def pct(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    return f"{100 * float(x):.{digits}f}%"


def num(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "n/a"
    return f"{float(x):.{digits}f}"


def layer_label(v) -> str:
    try:
        return f"L{int(v)}"
    except (TypeError, ValueError):
        return str(v)


def expert_label(v) -> str:
    try:
        e = int(v)
    except (TypeError, ValueError):
        return str(v)
    return "dropped" if e < 0 else f"E{e}"

