"""The Steer page's model side: load a model once per process, read its MoE layout, run a steering
experiment (baseline vs steered, optional random controls) in a scratch store, or — on request — into the
trace store, and pick a labelled dataset from the store to measure a spec on.

torch is imported only inside `load` / `run_pair` (when a model is loaded); `moelens.steering`'s spec
classes are plain data.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from moelens.store import TraceStore
from workbench.steer_effects import MIN_CONTROLS

#: The Steer page's defaults for the bundled demo model: its greedy continuation of this prompt changes
#: visibly with these experts of its first MoE layer disabled.
DEFAULT_PROMPT = "The capital of France is"
DEMO_DISABLE = ((0, 0), (0, 1), (0, 2), (0, 3))
#: Session-state keys of results that belong to one intervention (cleared when it stops being valid).
RESULT_KEYS = ("steer_result", "steer_positions", "steer_dataset", "steer_dose")


def available() -> bool:
    """True when ``moelens.steering`` is a real package (has an ``__init__.py``); never imports it."""
    try:
        spec = importlib.util.find_spec("moelens.steering")
    except (ImportError, ValueError):
        return False
    return bool(spec is not None and spec.origin and Path(spec.origin).name == "__init__.py")


def demo_model_dir() -> Path | None:
    """The bundled demo model's folder if it is installed (it needs a config file to be loadable)."""
    try:
        from moelens.demo import DEMO_MODEL_DIR
    except Exception:  # noqa: BLE001
        return None
    p = Path(DEMO_MODEL_DIR)
    return p if (p / "config.json").exists() else None


@st.cache_resource(show_spinner=False, max_entries=2)
def load(ref: str) -> tuple[Any, Any]:
    """``moelens.load(ref)`` once per process, in eval mode (routers may add jitter in training mode)."""
    import moelens

    model, tok = moelens.load(ref)
    model.eval()
    return model, tok


def layout_of(model: Any) -> dict[str, Any]:
    from moelens.adapters import find_routers

    info = find_routers(model)
    return {"layers": list(info.layers), "n_experts": int(info.n_experts), "top_k": int(info.top_k)}


def layout(ref: str) -> dict[str, Any]:
    model, _ = load(ref)
    return layout_of(model)


def layout_from_store(db: str | Path) -> dict[str, Any]:
    """Layers/experts of the store's newest run (a stand-in for choosing experts before a model is loaded)."""
    try:
        store = TraceStore(db, read_only=True, lock_timeout=2)
        runs = store.runs()
        if len(runs):
            run = int(runs["run_id"].iloc[-1])
            lay = store.layers(run)
            n = int(runs["n_experts"].iloc[-1]) if pd.notna(runs["n_experts"].iloc[-1]) else 8
            k = int(runs["top_k"].iloc[-1]) if pd.notna(runs["top_k"].iloc[-1]) else 2
            if len(lay):
                return {"layers": [int(v) for v in lay["layer"]], "n_experts": n, "top_k": k}
    except Exception:  # noqa: BLE001 - a missing/empty store: fall through to the placeholder
        pass
    return {"layers": [0, 1, 2, 3], "n_experts": 16, "top_k": 2}


def make_spec(
    *,
    disable=(),
    force=(),
    boost=(),
    boost_value: float = 2.0,
    boost_unit: str = "logit",
    gate_scale=(),
    beta: float = 4.0,
    mode: str = "reroute",
):
    """A `moelens.steering.SteeringSpec` from the page's choices (pairs are ``(layer, expert)``)."""
    from moelens.steering import SteeringSpec

    return SteeringSpec(
        disable=tuple(disable),
        force=tuple(force),
        boost={tuple(p): float(boost_value) for p in boost},
        boost_unit=boost_unit,
        gate_scale={tuple(p): float(beta) for p in gate_scale},
        mode=mode,
    )


def _sequence(store: TraceStore, run: int, seq_id: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    toks = store.tokens(run, seq_id)
    if "seq_id" not in toks.columns:
        toks.insert(0, "seq_id", seq_id)
    routing = store.query(
        "SELECT seq_id, pos, layer, rank, expert, weight FROM routing WHERE run_id = ? AND seq_id = ? ORDER BY pos, layer, rank",
        [int(run), int(seq_id)],
    )
    return toks, routing


def run_pair(
    model: Any,
    tok: Any,
    db: str | Path,
    prompt: str,
    spec: Any,
    *,
    max_new_tokens: int = 32,
    label: str | None = None,
    n_random: int = 0,
    save: bool = False,
) -> dict[str, Any]:
    """`moelens.steering.run_experiment` on one prompt: greedy continuation without and with ``spec`` (and
    ``n_random`` random controls of the same shape), recorded as runs into a scratch store, or into ``db`` with
    ``save``. Returns the two runs' tokens and routing, their ids (with ``save``), the experiment's tables and
    the request, so the same experiment can be saved later."""
    from moelens.steering import run_experiment

    store = TraceStore(db) if save else TraceStore(Path(tempfile.mkdtemp(prefix="moelens-steer-")) / "steer.duckdb")
    res = run_experiment(
        model, tok, spec, [prompt], store=store, labels=[label], n_random=int(n_random), generate=int(max_new_tokens),
        name=spec.describe(),
    )  # fmt: skip
    request = {"prompt": prompt, "max_new_tokens": int(max_new_tokens), "label": label, "n_random": int(n_random)}
    return {
        "baseline": _sequence(store, res.baseline_run),
        "steered": _sequence(store, res.steered_run),
        "runs": (res.baseline_run, res.steered_run) if save else None,
        "db": str(store.path),
        "spec": spec.to_dict(),
        "describe": spec.describe(),
        "request": request,
        "generated": str(res.generations["baseline"].iloc[0]) if res.generations is not None else "",
        "loss": res.loss,
        "routing": res.routing,
        "control": res.control if n_random else None,
    }


def spec_of(result: dict[str, Any]) -> Any:
    """The `SteeringSpec` a `run_pair` result was computed with."""
    from moelens.steering import SteeringSpec

    return SteeringSpec.from_dict(result["spec"])


def warn_few_controls(df: pd.DataFrame) -> None:
    """A z-score (or permutation p-value) over fewer than `MIN_CONTROLS` random controls is too coarse to read."""
    if "n_random" in df.columns and len(df) and int(df["n_random"].min()) < MIN_CONTROLS:
        n = int(df["n_random"].min())
        st.warning(f"Only {n} random control{'s' if n != 1 else ''}: z and p rest on too few to read (p can be no "
                   f"smaller than 1/{n + 1}); use at least {MIN_CONTROLS}.")


def dataset_picker(db: str | Path) -> tuple[list[str], list[str | None], str] | None:
    """Widgets to pick a labelled dataset from the store's runs: a run, its labels, sequences per label.
    Returns ``(texts, labels, description)``, or None (with a note) when the store holds no labelled run."""
    try:
        store = TraceStore(db, read_only=True, lock_timeout=2)
        runs = store.runs("complete")
    except Exception:  # noqa: BLE001 - a missing store: no dataset to offer
        runs = pd.DataFrame()
    labelled = runs[runs["labels"].notna()] if len(runs) else runs
    if labelled.empty:
        st.caption("The store holds no complete run with labelled sequences to measure on.")
        return None
    c1, c2, c3 = st.columns([2, 2, 1])
    ids = [int(v) for v in labelled["run_id"]]
    names = {int(r["run_id"]): f"#{int(r['run_id'])} · {r['name'] or r['model']}" for _, r in labelled.iterrows()}
    run = c1.selectbox("Dataset: the texts of run", ids, index=len(ids) - 1, key="steer_ds_run", format_func=names.get)
    seqs = store.query("SELECT seq_id, label, text FROM sequences WHERE run_id = ? AND label IS NOT NULL AND text IS "
                       "NOT NULL ORDER BY seq_id", [run])
    all_labels = sorted(seqs["label"].unique())
    chosen = c2.multiselect("Labels", all_labels, default=all_labels[:4], key="steer_ds_labels")
    per = c3.number_input("Sequences per label", 1, 64, 4, key="steer_ds_per")
    pick = seqs[seqs["label"].isin(chosen)].groupby("label", sort=True).head(int(per))
    if pick.empty:
        st.caption("Choose at least one label.")
        return None
    return list(pick["text"]), list(pick["label"]), f"run #{run}, {len(chosen)} labels"


def dataset_effect(model: Any, tok: Any, texts: list[str], labels: list[str | None], spec: Any, *,
                   n_random: int = MIN_CONTROLS, seq_len: int = 128) -> pd.DataFrame:
    """`run_experiment` over a labelled dataset (nothing recorded): its per-label summary against the controls."""
    from moelens.steering import run_experiment

    return run_experiment(model, tok, spec, texts, labels=labels, n_random=n_random, seq_len=seq_len).summary()


def dose_kinds(spec: Any) -> dict[str, str]:
    """The strengths a dose–response can vary for ``spec``: ``{"boost": ..., "gate": ...}`` where it has them."""
    kinds = {}
    if spec is not None and spec.boost:
        kinds["boost"] = f"boost offset ({spec.boost_unit})"
    if spec is not None and spec.gate_scale:
        kinds["gate"] = "gate-scale β"
    return kinds


def parse_grid(text: str) -> list[float]:
    """``"0, 1, 2.5"`` → ``[0.0, 1.0, 2.5]`` (sorted, unique); ``[]`` when any item is not a number."""
    try:
        return sorted({float(v) for v in text.replace(";", ",").split(",") if v.strip()})
    except ValueError:
        return []


def changed_positions(a: pd.DataFrame, b: pd.DataFrame) -> set[int]:
    """Positions where the two token tables hold different text (or only one has a token)."""
    merged = a[["pos", "token"]].merge(b[["pos", "token"]], on="pos", how="outer", suffixes=("_a", "_b"))
    differs = merged["token_a"].fillna("\0") != merged["token_b"].fillna("\0")
    return {int(p) for p in merged.loc[differs, "pos"]}
