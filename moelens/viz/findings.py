"""Self-describing findings: one plain-language sentence per chart, computed from the chart's own data.

Each function takes the same DataFrame the matching figure builder takes and returns one sentence that
names the number, where it is, and what it should be compared with (the baseline), e.g.
"Busiest expert: E5 took 23.1% of routed slots in layer L2; an even spread would be 6.2%."
The figure builders put the sentence under the chart title; the CLI and the app can print it on its own.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moelens.viz._frames import expert_label, layer_label, num, pct, pick


def _n_experts(df: pd.DataFrame, expert_col: str, n_experts: int | None) -> int:
    """E for a frame: the caller's, else the frame's ``n_experts`` column, else the largest expert id + 1.
    The figure builders use this too, so a chart's grid and its finding's even share 1/E use the same E."""
    if n_experts:
        return int(n_experts)
    if "n_experts" in df.columns and df["n_experts"].notna().any():
        return int(df["n_experts"].max())
    return int(df[expert_col].max()) + 1 if len(df) else 0


def load_finding(df: pd.DataFrame, value: str | None = None, n_experts: int | None = None) -> str:
    """Busiest (layer, expert) by load share vs the even share 1/E."""
    if df is None or df.empty:
        return "No routed tokens to describe."
    vcol = value or pick(df, ["share", "load_share", "count_share", "gate_share"], "load share")
    ecol = pick(df, ["expert"], "expert")
    d = df[df[ecol] >= 0].dropna(subset=[vcol])
    if d.empty:
        return "No routed tokens to describe."
    row = d.loc[d[vcol].idxmax()]
    E = _n_experts(df, ecol, n_experts)
    even = 1.0 / E if E else float("nan")
    weighted = "gate mass" if "gate" in vcol else "routed slots"
    ratio = float(row[vcol]) / even if E else float("nan")
    return (
        f"Busiest expert: {expert_label(row[ecol])} took {pct(row[vcol])} of {weighted} in layer "
        f"{layer_label(row['layer'])}; an even spread would be {pct(even)} ({num(ratio, 1)}× even)."
    )


def balance_finding(df: pd.DataFrame) -> str:
    """Least balanced layer by normalised load entropy, and the dead-expert count."""
    if df is None or df.empty:
        return "No layers to describe."
    hcol = pick(df, ["norm_entropy", "normalized_entropy", "entropy_norm", "load_entropy_norm"], "normalised entropy")
    d = df.dropna(subset=[hcol])
    if d.empty:
        return "No layer has routed tokens."
    row = d.loc[d[hcol].idxmin()]
    dcol = pick(df, ["dead_experts", "n_dead", "dead"], "dead experts", required=False)
    dead = ""
    if dcol is not None:
        total = int(pd.to_numeric(df[dcol], errors="coerce").fillna(0).sum())
        dead = f"; {total} dead expert{'s' if total != 1 else ''} across all layers" if total else "; no dead experts"
    eff = ""
    ecol = pick(df, ["effective_experts", "effective_n", "perplexity"], "effective experts", required=False)
    if ecol is not None and pd.notna(row[ecol]):
        eff = f" (≈{num(row[ecol], 1)} experts in effective use"
        if "n_experts" in df.columns and pd.notna(row.get("n_experts")):
            eff += f" of {int(row['n_experts'])}"
        eff += ")"
    return (
        f"Least balanced layer: {layer_label(row['layer'])} with normalised load entropy {num(row[hcol])}"
        f"{eff}; 1.00 would be an even spread{dead}."
    )


def specialization_finding(df: pd.DataFrame, value: str | None = None, baseline: float | None = None) -> str:
    """Most specialised (layer, expert, label) vs the uniform baseline k/E."""
    if df is None or df.empty:
        return "No labelled tokens: give sequences labels to see domain specialization."
    vcol = value or pick(df, ["specialization", "spec", "share"], "specialization")
    d = df.dropna(subset=[vcol])
    d = d[d["expert"] >= 0] if "expert" in d.columns else d
    if d.empty:
        return "No labelled tokens to describe."
    row = d.loc[d[vcol].idxmax()]
    base = baseline
    if base is None and "baseline" in d.columns and pd.notna(row.get("baseline")):
        base = float(row["baseline"])
    tail = ""
    if base:
        tail = f"; uniform routing would give {pct(base)} ({num(float(row[vcol]) / base, 1)}× lift)"
    return (
        f"Most specialised: {expert_label(row['expert'])} in layer {layer_label(row['layer'])} takes "
        f"{pct(row[vcol])} of '{row['label']}' tokens{tail}."
    )


def repetition_finding(df: pd.DataFrame) -> str:
    """Layer with the highest first-choice repetition vs its baselines (``repetition`` output)."""
    if df is None or df.empty:
        return "No consecutive token pairs to describe."
    obs = pick(df, ["first_choice", "first", "top1"], "first-choice rate")
    d = df.dropna(subset=[obs])
    if d.empty:
        return "No consecutive token pairs to describe."
    num = [c for c in d.columns if c != "layer" and pd.api.types.is_numeric_dtype(d[c])]
    g = d.groupby("layer", as_index=False)[num].mean()
    row = g.loc[g[obs].idxmax()]
    text = (
        f"Layer {layer_label(row['layer'])} keeps the same first-choice expert on {pct(row[obs])} of consecutive "
        "token pairs"
    )
    base = []
    u = pick(g, ["uniform_first", "first_uniform"], "uniform baseline", required=False)
    if u is not None:
        base.append(f"{pct(row[u])} for uniform routing")
    lb = pick(g, ["sum_sq_first", "first_load"], "load baseline", required=False)
    if lb is not None:
        base.append(f"{pct(row[lb])} for independent draws from its own load (Σq²)")
    if base:
        text += " vs " + " and ".join(base)
    return text + "."


def curve_finding(df: pd.DataFrame, x: str, y: str, what: str, x_name: str) -> str:
    """Best layer at the smallest x, and how it changes at the largest x (SRP, SCH)."""
    if df is None or df.empty:
        return f"No data for {what}."
    d = df.dropna(subset=[y])
    if d.empty:
        return f"No data for {what}."
    xs = sorted(d[x].unique())
    lo = d[d[x] == xs[0]]
    row = lo.loc[lo[y].idxmax()]
    text = f"Highest {what}: layer {layer_label(row['layer'])} reaches {num(row[y])} at {x_name} {xs[0]:g}"
    if len(xs) > 1:
        hi = d[(d[x] == xs[-1]) & (d["layer"] == row["layer"])]
        if len(hi):
            text += f", {num(hi[y].iloc[0])} at {xs[-1]:g}"
    return text + "."


def coactivation_finding(df: pd.DataFrame, value: str | None = None, baseline: float | None = None) -> str:
    if df is None or df.empty:
        return "No co-activated pairs (k = 1 routes one expert per token)."
    vcol = value or pick(df, ["p_j_given_i", "conditional", "coactivation", "value", "jaccard", "npmi"], "co-activation")
    a = pick(df, ["expert_i", "expert_a", "i", "expert"], "first expert")
    b = pick(df, ["expert_j", "expert_b", "j", "other"], "second expert")
    d = df[df[a] != df[b]].dropna(subset=[vcol])
    if d.empty:
        return "No co-activated pairs."
    row = d.loc[d[vcol].idxmax()]
    tail = f" (uniform routing: {pct(baseline)})" if baseline else ""
    lay = f" in layer {layer_label(row['layer'])}" if "layer" in d.columns else ""
    if vcol in ("p_j_given_i", "conditional", "coactivation", "value"):
        return (
            f"Strongest pair{lay}: when {expert_label(row[a])} is picked, {expert_label(row[b])} is picked too "
            f"{pct(row[vcol])} of the time{tail}."
        )
    return f"Strongest pair{lay}: {expert_label(row[a])} and {expert_label(row[b])} ({vcol} {num(row[vcol])}){tail}."


def committee_finding(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "No standing committee found (needs at least two labels)."
    cov = pick(df, ["coverage", "Coverage"], "coverage")
    size = pick(df, ["size", "Size", "committee_size"], "committee size")
    d = df.dropna(subset=[cov])
    if d.empty:
        return "No standing committee found."
    row = d.loc[d[cov].idxmax()]
    return (
        f"Layer {layer_label(row[pick(df, ['layer', 'Layer'], 'layer')])} has a standing committee of "
        f"{int(row[size])} expert{'s' if int(row[size]) != 1 else ''} that holds {pct(row[cov])} of the top-K "
        f"routing mass across all labels (mean committee coverage over layers {pct(d[cov].mean())})."
    )


def npmi_finding(df: pd.DataFrame, value: str | None = None, what: str = "the selection") -> str:
    if df is None or df.empty:
        return f"No tokens match {what}."
    vcol = value or pick(df, ["npmi", "score", "risk_diff"], "score")
    d = df.dropna(subset=[vcol])
    if d.empty:
        return f"No tokens match {what}."
    row = d.loc[d[vcol].idxmax()]
    return (
        f"Most associated with {what}: {expert_label(row['expert'])} in layer {layer_label(row['layer'])} "
        f"({vcol} {num(row[vcol])}; 0 = independent, 1 = always together)."
    )


def agreement_finding(df: pd.DataFrame, value: str | None = None) -> str:
    if df is None or df.empty:
        return "The two runs share no aligned tokens."
    vcol = value or pick(df, ["topk_overlap", "topk_agreement", "agreement", "overlap", "top1_agreement"], "agreement")
    d = df.dropna(subset=[vcol])
    if d.empty:
        return "The two runs share no aligned tokens."
    lo = d.loc[d[vcol].idxmin()]
    if "n_tokens" in d.columns and d["n_tokens"].sum() > 0:
        overall = float(np.average(d[vcol], weights=d["n_tokens"]))
    else:
        overall = float(d[vcol].mean())
    base = pick(d, ["baseline", "uniform", "chance"], "baseline", required=False)
    tail = f"; uniform-random chance {pct(d[base].iloc[0])}" if base is not None else ""
    return (
        f"The runs agree on {pct(overall)} of top-k choices overall; lowest in layer {layer_label(lo['layer'])} "
        f"({pct(lo[vcol])}){tail}."
    )


def map_finding(df: pd.DataFrame, color: str | None = None) -> str:
    if df is None or df.empty:
        return "No experts to place."
    n = len(df)
    n_layers = df["layer"].nunique() if "layer" in df.columns else 0
    text = f"{n} (layer, expert) points from {n_layers} layer{'s' if n_layers != 1 else ''}, placed by routing profile"
    if color and color in df.columns and color != "layer":
        top = df[color].value_counts()
        if len(top):
            text += f"; '{top.index[0]}' dominates {int(top.iloc[0])} of {n}"
    return text + "; nearby points route similar tokens."


def top_tokens_finding(df: pd.DataFrame, layer: int, expert: int) -> str:
    if df is None or df.empty:
        return f"{expert_label(expert)} in layer {layer_label(layer)} received no tokens."
    ccol = pick(df, ["count", "n"], "count")
    tcol = pick(df, ["token", "text"], "token")
    row = df.loc[df[ccol].idxmax()]
    share = ""
    scol = pick(df, ["share", "fraction"], "share", required=False)
    if scol is not None and pd.notna(row[scol]):
        share = f" ({pct(row[scol])} of its tokens)"
    return f"{expert_label(expert)} in layer {layer_label(layer)} most often receives {repr(str(row[tcol]))}{share}."

