"""Routing-strategy sweeps: loss per label against the compute each strategy spends (experts per token).

The question the top-k studies (Switch, arXiv:2101.03961; M6-T, arXiv:2105.15082) and dynamic routing (Huang et
al. 2024, arXiv:2403.07652) ask is a trade-off curve, not a single number: how much loss does each expert per
token buy? `sweep_routing` evaluates fixed k = 1..E and top-p over a grid on exactly the same teacher-forced
batches as the unmodified model (the control every point is measured against), and reports per strategy and label
the loss, its change, the KL from the baseline and the mean number of experts routed per token and layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from moelens.adapters import find_routers
from moelens.errors import InputError, SteeringError
from moelens.recording.inputs import documents
from moelens.recording.tokenize import chunk_documents
from moelens.steering.experiment import _evaluate
from moelens.adapters import unwrap
from moelens.steering.spec import SteeringSpec

DEFAULT_TOP_P = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def strategy_specs(info: Any, top_k: Sequence[int] | None = None, top_p: Sequence[float] | None = DEFAULT_TOP_P,
                   k_max: int | None = None) -> dict[str, SteeringSpec]:
    """``{"top_k=1": spec, ..., "top_p=0.5": spec}``; ``top_k=None`` means every k from 1 to E."""
    free = [site.n_experts for site in info.sites if not site.fixed_k]
    if not free:
        why = "; ".join(sorted({site.fixed_k for site in info.sites}))
        raise SteeringError(f"no layer of this model can change its number of experts per token: {why}")
    n_experts = min(free)
    ks = range(1, n_experts + 1) if top_k is None else top_k
    specs = {f"top_k={k}": SteeringSpec(top_k=int(k)) for k in ks}
    specs.update({f"top_p={p:g}": SteeringSpec(top_p=float(p), k_max=k_max) for p in (top_p or ())})
    return specs


def sweep_routing(
    model: Any,
    tokenizer: Any,
    inputs: Any,
    *,
    labels: Any = None,
    top_k: Sequence[int] | None = None,
    top_p: Sequence[float] | None = DEFAULT_TOP_P,
    k_max: int | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    text_field: str = "text",
    label_field: str | None = "label",
    progress: bool = False,
) -> pd.DataFrame:
    """One row per (strategy, label) and an ``all`` row per strategy, with the baseline as strategy ``native``.

    Columns: ``variant``, ``strategy`` (native / top_k / top_p), ``value`` (k or p), ``label``, ``n_tokens``,
    ``loss``, ``loss_base``, ``delta_loss`` (nats/token), ``ppl``, ``kl`` (mean KL(base ‖ variant)) and
    ``experts_per_token`` (mean over tokens and MoE layers whose k can change).
    """
    module = unwrap(model)
    info = find_routers(module)
    if info.is_encoder_decoder:
        raise SteeringError("sweep_routing compares next-token losses of decoder-only models")
    specs = strategy_specs(info, top_k, top_p, k_max)
    docs = list(documents(inputs, labels if labels is None or isinstance(labels, str) else list(labels),
                          text_field=text_field, label_field=label_field))
    chunks = [c for c in chunk_documents(docs, tokenizer, seq_len) if len(c.ids) >= 2]
    if not chunks:
        raise InputError("nothing to evaluate: the inputs hold no sequence of at least 2 tokens")
    native_k = {site.layer: site.top_k for site in info.sites if not site.fixed_k}
    frames = _evaluate(module, info, tokenizer, chunks, {"native": SteeringSpec(), **specs}, batch_size, progress)
    return _table(frames["tokens"], frames["routing"], native_k)


def _table(tokens: pd.DataFrame, routing: pd.DataFrame, native_k: dict[int, int]) -> pd.DataFrame:
    """Loss per (variant, label) and pooled, joined with the mean experts per token of the changeable layers."""
    tokens = tokens.assign(label=tokens["label"].astype(object).where(tokens["label"].notna(), None))
    pooled = pd.concat([tokens, tokens.assign(label="all")])
    loss = (pooled.groupby(["variant", "label"], dropna=False, sort=False)
            .agg(n_tokens=("logprob", "size"), loss=("logprob", "mean"), loss_base=("logprob_base", "mean"),
                 kl=("kl", "mean"))
            .reset_index())
    loss[["loss", "loss_base"]] *= -1
    loss["delta_loss"] = loss["loss"] - loss["loss_base"]
    loss["ppl"] = np.exp(loss["loss"])
    moe = routing[routing["layer"].isin(native_k)]
    moe = pd.concat([moe, moe.assign(label="all")])
    weighted = moe.assign(mass=moe["experts_per_token"] * moe["n_tokens"])
    ept = weighted.groupby(["variant", "label"], dropna=False, sort=False)[["mass", "n_tokens"]].sum()
    ept = (ept["mass"] / ept["n_tokens"]).rename("experts_per_token").reset_index()
    out = loss.merge(ept, on=["variant", "label"], how="left")
    strategy = out["variant"].str.partition("=")
    out.insert(1, "strategy", strategy[0].where(strategy[1] == "=", "native"))
    out.insert(2, "value", pd.to_numeric(strategy[2], errors="coerce"))
    out["label"] = out["label"].astype(object).where(out["label"].notna(), None)
    cols = ["variant", "strategy", "value", "label", "n_tokens", "loss", "loss_base", "delta_loss", "ppl", "kl",
            "experts_per_token"]
    return out[cols]
