"""Expert load, balance and shared-expert gates.

Load is the first thing to look at and the easiest to get wrong: counts are never capped (a capped counter
reads as perfect balance, peers.md §4), the mean in max/mean runs over all E experts (dead ones included),
and count- and gate-weighted loads are reported side by side because they can disagree.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from moelens.analysis._common import Source, entropy, group_expert_counts, resolve, result


def expert_load(source: Source, run: int | None = None, *, phase: str | None = None, by_label: bool = False) -> pd.DataFrame:
    """Per (layer, expert) [, label]: ``count`` of routed slots n_e, ``activation_rate`` n_e/|U| (sums to k
    over experts when every token has k routed slots), ``share`` n_e/Σn, ``gate_mass`` Σ gate weight and
    ``gate_share``. With ``by_label`` U is each label's tokens (unlabelled tokens form the
    label None). Rates over an empty token set are NaN.
    """
    data = resolve(source, run, phase=phase)
    names: list[str | None] = list(data.label_names)
    if by_label:
        group = np.where(data.label >= 0, data.label, len(names))
        names.append(None)
    else:
        group = np.zeros(data.n_tokens, np.int64)
        names = [None]
    n_groups = len(names)
    n_tok = np.bincount(group, minlength=n_groups).astype(np.float64)
    frames = []
    for li, layer in enumerate(data.layer_ids):
        E = int(data.n_experts[li])
        count = group_expert_counts(data.experts[li], E, group, n_groups)
        mass = group_expert_counts(data.experts[li], E, group, n_groups, weights=data.weights[li])
        with np.errstate(invalid="ignore", divide="ignore"):
            frame = pd.DataFrame(
                {
                    "layer": int(layer),
                    "expert": np.tile(np.arange(E), n_groups),
                    "label": np.repeat(np.array(names, dtype=object), E),
                    "count": count.ravel(),
                    "activation_rate": (count / n_tok[:, None]).ravel(),
                    "share": (count / count.sum(axis=1, keepdims=True)).ravel(),
                    "gate_mass": mass.ravel(),
                    "gate_share": (mass / mass.sum(axis=1, keepdims=True)).ravel(),
                }
            )
        present = np.repeat(n_tok > 0, E) if by_label else np.ones(len(frame), bool)
        frames.append(frame[present])
    df = pd.concat(frames) if frames else pd.DataFrame(columns=["layer", "expert", "label", "count"])
    if not by_label:
        df = df.drop(columns="label")
    return result(df, data, "expert_load", by_label=by_label, reference="Switch Transformer (arXiv 2101.03961) load balance; OLMoE (arXiv 2409.02060) §5")


def layer_balance(source: Source, run: int | None = None, *, phase: str | None = None) -> pd.DataFrame:
    """Per layer: ``entropy`` H = −Σ f ln f of the load shares (nats), ``norm_entropy`` H/ln E,
    ``effective_experts`` exp(H), ``max_mean`` E·max f, ``maxvio`` max_mean − 1 (arXiv 2408.15664),
    ``cv`` population std/mean of the counts, ``dead_experts`` (count 0).
    NaN where the layer has no routed slot."""
    data = resolve(source, run, phase=phase)
    rows = []
    for li, layer in enumerate(data.layer_ids):
        E = int(data.n_experts[li])
        n = group_expert_counts(data.experts[li], E)[0]
        total = n.sum()
        row = {"layer": int(layer), "n_experts": E, "top_k": int(data.top_k[li]), "n_tokens": data.n_tokens}
        if total == 0:
            row.update(dict.fromkeys(["entropy", "norm_entropy", "effective_experts", "max_mean", "maxvio", "cv"], np.nan))
            row["dead_experts"] = E if data.n_tokens else np.nan
        else:
            f = n / total
            h = float(entropy(f))
            row.update(
                entropy=h,
                norm_entropy=h / np.log(E) if E > 1 else np.nan,
                effective_experts=float(np.exp(h)),
                max_mean=float(E * f.max()),
                maxvio=float(E * f.max() - 1),
                cv=float(n.std() / n.mean()),
                dead_experts=int((n == 0).sum()),
            )
        rows.append(row)
    return result(pd.DataFrame(rows), data, "layer_balance", reference="Switch Transformer (arXiv 2101.03961) load balance; OLMoE (arXiv 2409.02060) §5")


def shared_expert_stats(source: Source, run: int | None = None, *, phase: str | None = None) -> pd.DataFrame:
    """Per layer with a shared expert: ``n_tokens`` with a recorded gate and the gate's ``mean``, ``std``
    (population), ``min`` and ``max``. Empty when the run has no shared experts. [moelens]"""
    data = resolve(source, run, phase=phase)
    columns = ["layer", "n_tokens", "mean_gate", "std_gate", "min_gate", "max_gate"]
    rows = []
    for li, layer in enumerate(data.layer_ids if data.shared_gate is not None else []):
        gate = data.shared_gate[li]  # type: ignore[index]
        gate = gate[~np.isnan(gate)].astype(np.float64)
        if len(gate):
            rows.append([int(layer), len(gate), gate.mean(), gate.std(), gate.min(), gate.max()])
    return result(pd.DataFrame(rows, columns=columns), data, "shared_expert_stats", reference="[moelens]")
