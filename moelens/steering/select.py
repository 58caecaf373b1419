"""Build specs from analysis results, and random specs of the same shape as controls.

An intervention on the "top experts for X" means little on its own: disabling any 4 experts changes a model.
`random_like` draws the same number of experts in the same layers (never the chosen ones) with the same action
and values, so that an experiment can compare the effect against chance (MoTE reports exactly this contrast).
No torch here: the builders take a layout ``{layer: n_experts}``, a `MoEInfo`, or a model (discovered lazily).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from moelens.errors import SteeringError
from moelens.steering.spec import Pair, SteeringSpec

ACTIONS = ("disable", "force", "boost", "gate_scale")


def expert_layout(model_or_info: Any) -> dict[int, int]:
    """``{layer: number of routed experts}`` of a model, a `MoEInfo` or an existing layout mapping."""
    if isinstance(model_or_info, Mapping):
        return {int(layer): int(n) for layer, n in model_or_info.items()}
    sites = getattr(model_or_info, "sites", None)
    if sites is None:
        from moelens.adapters import find_routers, unwrap

        sites = find_routers(unwrap(model_or_info)).sites
    return {site.layer: site.n_experts for site in sites}


#: The column that ranks experts in each analysis result, so ``spec_from_scores(npmi(...))`` needs no score_col.
_SCORE_COLUMNS = {
    "npmi": "npmi",
    "npmi_combined": "score",
    "risk_difference": "risk_diff",
    "domain_specialization": "spec",
    "expert_load": "share",
}


def spec_from_scores(
    df: Any,
    n: int = 4,
    *,
    action: str = "disable",
    score_col: str | None = None,
    label: str | None = None,
    per_layer: bool = False,
    largest: bool = True,
    value: float | None = None,
    mode: str = "reroute",
) -> SteeringSpec:
    """A spec acting on the ``n`` best-scoring (layer, expert) rows of an analysis result.

    ``df`` has ``layer``, ``expert`` and the score column (``score_col``; default: the ranking column of the
    analysis that made ``df`` (e.g. ``npmi`` for `npmi`), else the column named ``score``).
    ``label`` keeps only rows of that label (e.g. the domain of ``domain_specialization`` or ``npmi``);
    ``per_layer`` takes ``n`` per layer instead of ``n`` overall; ``largest=False`` takes the lowest scores.
    NaN scores are skipped; ties are broken by (layer, expert) so the choice is reproducible.
    """
    if score_col is None:
        score_col = _SCORE_COLUMNS.get(getattr(df, "attrs", {}).get("params", {}).get("score"))
    if score_col is None:
        if "score" not in df.columns:
            numeric = [c for c in df.columns if df[c].dtype.kind in "fiu" and c not in ("layer", "expert")]
            raise SteeringError(f"say which column ranks the experts: score_col=one of {numeric}")
        score_col = "score"
    missing = {"layer", "expert", score_col} - set(df.columns)
    if missing:
        raise SteeringError(f"scores table lacks columns {sorted(missing)}; it has {list(df.columns)}")
    rows = df
    if label is not None:
        if "label" not in df.columns:
            raise SteeringError("label= needs a 'label' column in the scores table")
        rows = df[df["label"] == label]
        if rows.empty:
            raise SteeringError(f"no rows with label {label!r}; labels are {sorted(df['label'].dropna().unique())}")
    rows = rows.dropna(subset=[score_col]).sort_values(
        [score_col, "layer", "expert"], ascending=[not largest, True, True], kind="stable"
    )
    rows = rows.groupby("layer", sort=False).head(n) if per_layer else rows.head(n)
    pairs = [(int(layer), int(expert)) for layer, expert in zip(rows["layer"], rows["expert"])]
    if len(dict.fromkeys(pairs)) < len(pairs):
        raise SteeringError("the scores table has several rows per (layer, expert); filter it (e.g. label=...) first")
    return _spec(action, pairs, value, mode)


def random_spec(
    model_or_info: Any,
    n: int | Mapping[int, int],
    seed: int = 0,
    *,
    exclude: Iterable[Pair] = (),
    action: str = "disable",
    value: float | None = None,
    mode: str = "reroute",
) -> SteeringSpec:
    """``n`` random (layer, expert) pairs (uniform over all pairs not in ``exclude``), or ``{layer: count}``."""
    layout = expert_layout(model_or_info)
    rng = random.Random(seed)
    excluded = {tuple(p) for p in exclude}
    if isinstance(n, Mapping):
        pairs = [p for layer, count in sorted(n.items()) for p in _draw(rng, layout, layer, count, excluded)]
    else:
        pool = [(layer, e) for layer, size in sorted(layout.items()) for e in range(size) if (layer, e) not in excluded]
        if n > len(pool):
            raise SteeringError(f"cannot draw {n} random experts: only {len(pool)} are not excluded")
        pairs = rng.sample(pool, n)
    return _spec(action, pairs, value, mode)


def random_like(spec: SteeringSpec, model_or_info: Any, seed: int = 0) -> SteeringSpec:
    """A control for ``spec``: per action and layer, as many random experts as ``spec`` has, with its values.

    Experts ``spec`` touches are never drawn; ``top_k``, ``mode``, ``boost_unit`` and ``logit_std`` are kept,
    so the control differs from ``spec`` only in which experts it acts on.
    """
    layout = expert_layout(model_or_info)
    rng = random.Random(seed)
    taken = set(spec.pairs())

    def redraw(pairs: Iterable[Pair]) -> dict[Pair, Pair]:
        """Original pair -> its random stand-in in the same layer."""
        out: dict[Pair, Pair] = {}
        by_layer: dict[int, list[Pair]] = {}
        for pair in pairs:
            by_layer.setdefault(pair[0], []).append(pair)
        for layer, originals in sorted(by_layer.items()):
            drawn = _draw(rng, layout, layer, len(originals), taken)
            taken.update(drawn)
            out.update(zip(originals, drawn))
        return out

    disable = redraw(spec.disable)
    force = redraw(spec.force)
    boost = redraw(p for p, _ in spec.boost)
    gate = redraw(p for p, _ in spec.gate_scale)
    return replace(
        spec,
        disable=tuple(disable.values()),
        force=tuple(force.values()),
        boost=tuple((boost[p], v) for p, v in spec.boost),
        gate_scale=tuple((gate[p], v) for p, v in spec.gate_scale),
    )


def _draw(rng: random.Random, layout: Mapping[int, int], layer: int, count: int, excluded: set) -> list[Pair]:
    if layer not in layout:
        raise SteeringError(f"layer {layer} has no MoE router; MoE layers are {sorted(layout)}")
    pool = [(layer, e) for e in range(layout[layer]) if (layer, e) not in excluded]
    if count > len(pool):
        raise SteeringError(f"cannot draw {count} random experts in layer {layer}: only {len(pool)} are free")
    return rng.sample(pool, count)


def _spec(action: str, pairs: list[Pair], value: float | None, mode: str) -> SteeringSpec:
    if action not in ACTIONS:
        raise SteeringError(f"action must be one of {ACTIONS}, not {action!r}")
    if action in ("disable", "force"):
        return SteeringSpec(**{action: pairs}, mode=mode)
    if value is None:
        raise SteeringError(f"action={action!r} needs value= (the boost in logits, or the gate scale beta)")
    return SteeringSpec(**{action: {p: value for p in pairs}}, mode=mode)
