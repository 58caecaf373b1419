"""Held-out loss before and after pruning, for importance scores against frequency and random controls.

A pruning is evaluated on the original model with the removed experts disabled by rerouting
(``steer(disable=plan.removed, mode="reroute")``), which the checkpoint tests show equals the written pruned
checkpoint, so per-layer plans (which no config can express) are evaluated too, and nothing is written.
Every variant runs on the same teacher-forced batches as the unpruned baseline. Random controls keep the same
number of experts per layer (and per routing group) with seeds ``seed, seed + 1, ...``: a score is only useful
if it beats them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from moelens.analysis.registry import run_score
from moelens.errors import InputError
from moelens.pruning.checkpoint import model_layout
from moelens.pruning.plan import PrunePlan, plan_from_scores, random_plan
from moelens.pruning.prune import check_run_matches
from moelens.recording.inputs import documents
from moelens.recording.tokenize import chunk_documents
from moelens.recording.record import pad_id, right_padded
from moelens.steering import steer
from moelens.store import TraceStore

Progress = Callable[[float, str], None]


def plans_for(model: Any, store: TraceStore, run: int, scores: Sequence[str], keep: float, *, per_layer: bool = False,
              n_random: int = 5, seed: int = 0, score_params: dict | None = None) -> dict[str, PrunePlan]:
    """``{name: plan}``: one plan per score and ``random:i`` controls with the first plan's per-layer counts."""
    layout = model_layout(model)
    plans = {name: plan_from_scores(run_score(store, run, name, **(score_params or {}).get(name, {})), layout, keep,
                                    per_layer=per_layer) for name in scores}
    counts = next(iter(plans.values())).counts
    plans.update({f"random:{i}": random_plan(layout, counts, seed + i) for i in range(n_random)})
    return plans


def evaluate_pruning(model: Any, tokenizer: Any, store: TraceStore, run: int, inputs: Any, *,
                     scores: Sequence[str] = ("reap", "frequency"), keep: Iterable[float] = (0.5,),
                     per_layer: bool = False, n_random: int = 5, seed: int = 0, batch_size: int = 8,
                     seq_len: int = 256, score_params: dict | None = None, label_field: str | None = "label",
                     progress: Progress | None = None) -> pd.DataFrame:
    """Per (keep, method, label): ``n_tokens``, ``loss_base`` (unpruned), ``loss`` and ``delta`` (nats/token);
    for ``method == "random"`` the mean over the ``n_random`` controls and their ``std``. Label ``"all"`` pools
    every evaluated token. ``inputs`` must be disjoint from the texts of ``run`` (the calibration data)."""
    check_run_matches(store, run, model)
    chunks = [c for c in chunk_documents(documents(inputs, label_field=label_field), tokenizer, seq_len) if len(c.ids) >= 2]
    if not chunks:
        raise InputError("nothing to evaluate: the inputs hold no sequence of at least 2 tokens")
    keeps = list(keep)
    variants: dict[str, list[tuple[int, int]]] = {}
    for fraction in keeps:
        for name, plan in plans_for(model, store, run, scores, fraction, per_layer=per_layer, n_random=n_random,
                                    seed=seed, score_params=score_params).items():
            variants[f"{fraction}|{name}"] = plan.removed
    parts, pad, device = [], pad_id(tokenizer, model), next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start:start + batch_size]
            ids, mask = (t.to(device) for t in right_padded(batch, pad))
            real = (mask[:, 1:] & mask[:, :-1]).bool().cpu().numpy()  # next-token targets with a real context
            labels = np.broadcast_to(np.array([c.label for c in batch], dtype=object)[:, None], real.shape)[real]
            base = _target_logprobs(model, ids, mask)[real]
            for variant, removed in variants.items():
                with steer(model, disable=removed, mode="reroute"):
                    logprob = _target_logprobs(model, ids, mask)[real]
                parts.append(pd.DataFrame({"variant": variant, "label": labels, "logprob_base": base, "logprob": logprob}))
            if progress is not None:
                done = min(start + batch_size, len(chunks))
                progress(done / len(chunks), f"{done}/{len(chunks)} sequences x {len(variants)} prunings")
    return _loss_table(pd.concat(parts, ignore_index=True))


def _target_logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """``[B, S-1]`` log-probability of each actual next token (teacher forcing)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).cpu().numpy()


def _loss_table(tokens: pd.DataFrame) -> pd.DataFrame:
    tokens = pd.concat([tokens, tokens.assign(label="all")], ignore_index=True)
    tokens[["keep", "variant"]] = tokens["variant"].str.split("|", n=1, expand=True)
    per = (tokens.groupby(["keep", "variant", "label"], sort=False)
           .agg(n_tokens=("logprob", "size"), loss_base=("logprob_base", "mean"), loss=("logprob", "mean"))
           .reset_index())
    per[["loss_base", "loss"]] *= -1
    per["method"] = per["variant"].str.replace(r":\d+$", "", regex=True)
    out = (per.groupby(["keep", "method", "label"], sort=False)
           .agg(n_tokens=("n_tokens", "first"), loss_base=("loss_base", "first"), loss=("loss", "mean"),
                std=("loss", lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else np.nan))
           .reset_index())
    out["keep"] = out["keep"].astype(float)
    out["delta"] = out["loss"] - out["loss_base"]
    return out


def markdown_table(result: pd.DataFrame, keep: float) -> str:
    """One keep fraction as a markdown table: a row per method, a column per label (loss, ± std for random)."""
    rows = result[result["keep"] == keep]
    labels = [lab for lab in dict.fromkeys(rows["label"]) if lab != "all"] + ["all"]
    base = rows.drop_duplicates("label").set_index("label")["loss_base"]
    lines = [f"| keep {keep:.0%} | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|",
             "| unpruned | " + " | ".join(f"{base[lab]:.3f}" for lab in labels) + " |"]
    for method, group in rows.groupby("method", sort=False):
        g = group.set_index("label")
        cells = [f"{g.loc[lab, 'loss']:.3f}" + (f" ± {g.loc[lab, 'std']:.3f}" if not np.isnan(g.loc[lab, "std"]) else "")
                 for lab in labels]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
