"""Cached app-side queries that are not plain analysis calls: bootstrap intervals over a run's sequences."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from workbench.data import _freeze, batch


@st.cache_data(show_spinner=False, max_entries=64)
def bootstrapped(db: str, stamp: float, name: str, run: int, n_boot: int, seed: int, params: tuple) -> pd.DataFrame:
    """``moelens.analysis.bootstrap.bootstrap(name, store, run, n_boot=..., seed=..., **params)``, cached."""
    from moelens.analysis.bootstrap import bootstrap

    with batch(db) as store:
        return bootstrap(name, store, int(run), n_boot=int(n_boot), seed=int(seed), **dict(params))


def bootstrap(db: str, stamp: float, name: str, run: int, n_boot: int, seed: int, **params: Any) -> pd.DataFrame:
    return bootstrapped(db, stamp, name, run, n_boot, seed, _freeze(params))


@st.cache_data(show_spinner=False, max_entries=128)
def logit_layers(db: str, stamp: float, run: int) -> list[int]:
    """The layers of ``run`` that have router logits recorded (empty for runs recorded without --logits)."""
    with batch(db) as store:
        df = store.query("SELECT DISTINCT layer FROM router_logits WHERE run_id = ? ORDER BY layer", [int(run)])
    return [int(v) for v in df["layer"]]
