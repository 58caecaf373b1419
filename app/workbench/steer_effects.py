"""What a steering spec does, position by position and dose by dose, without writing anything to a store.

`position_effects` runs one text through the model with and without the spec (teacher-forced) and returns,
per predicted token, the log-prob of the actual next token before/after, the next-token KL and the top-5
predictions before/after. `dose_response` scales the spec's boost offset or gate-scale β over a grid and
runs `moelens.steering.run_experiment` (random controls of the same shape) at every value, so an effect can be
read against what random experts of the same layers do at the same strength. torch is imported on call only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

#: Fewer random controls than this make a z-score (and its permutation p-value) too coarse to read.
MIN_CONTROLS = 5


def _token_text(tok: Any, token_id: int) -> str:
    return tok.decode([int(token_id)])


def position_effects(model: Any, tok: Any, text: str, spec: Any, *, top: int = 5) -> pd.DataFrame:
    """One row per predicted position of ``text``: ``pos, token, logprob_base, logprob, delta_logprob, kl,
    top_base, top_steered, top1_changed`` (top predictions as ``'tok' p`` strings, the most likely first)."""
    import torch

    from moelens.steering import steer
    from moelens.adapters import unwrap

    module = unwrap(model)
    ids = tok(text, return_tensors="pt").input_ids.to(next(module.parameters()).device)
    if ids.shape[1] < 2:
        return pd.DataFrame(columns=["pos", "token", "logprob_base", "logprob", "delta_logprob", "kl",
                                     "top_base", "top_steered", "top1_changed"])
    with torch.inference_mode():
        base = torch.log_softmax(module(ids).logits[0, :-1].float(), -1)
        with steer(module, spec):
            steered = torch.log_softmax(module(ids).logits[0, :-1].float(), -1)
    target = ids[0, 1:]
    lp_base = base.gather(-1, target[:, None])[:, 0].cpu().numpy()
    lp = steered.gather(-1, target[:, None])[:, 0].cpu().numpy()
    kl = (base.exp() * (base - steered)).sum(-1).cpu().numpy()
    tb, ts = base.topk(top, -1), steered.topk(top, -1)

    def shown(values: torch.Tensor, indices: torch.Tensor) -> list[str]:
        return [" ".join(f"{_token_text(tok, i)!r} {np.exp(v):.2f}" for v, i in zip(vs, ix))
                for vs, ix in zip(values.cpu().tolist(), indices.cpu().tolist())]

    return pd.DataFrame({
        "pos": np.arange(1, ids.shape[1]),
        "token": [_token_text(tok, t) for t in target.tolist()],
        "logprob_base": lp_base,
        "logprob": lp,
        "delta_logprob": lp - lp_base,
        "kl": kl,
        "top_base": shown(tb.values, tb.indices),
        "top_steered": shown(ts.values, ts.indices),
        "top1_changed": (tb.indices[:, 0] != ts.indices[:, 0]).cpu().numpy(),
    })  # fmt: skip


def scaled(spec: Any, what: str, value: float) -> Any:
    """``spec`` with every boost offset (``what="boost"``) or gate-scale β (``what="gate"``) set to ``value``."""
    if what == "boost":
        return replace(spec, boost=tuple((p, float(value)) for p, _ in spec.boost))
    if what == "gate":
        return replace(spec, gate_scale=tuple((p, float(value)) for p, _ in spec.gate_scale))
    raise ValueError(f"dose-response scales 'boost' or 'gate', not {what!r}")


def dose_response(model: Any, tok: Any, texts: list[str], labels: list[str | None], spec: Any, what: str,
                  grid: list[float], *, n_random: int = MIN_CONTROLS, seed: int = 0, seq_len: int = 128) -> pd.DataFrame:
    """Per grid value and label: the steered ``delta_loss``, the random controls' mean and std, ``z`` and its
    permutation p-value ``p_perm`` (`run_experiment`'s control table), nothing recorded."""
    from moelens.steering import run_experiment

    frames = []
    for value in grid:
        res = run_experiment(model, tok, scaled(spec, what, value), texts, labels=labels, n_random=n_random,
                             seed=seed, seq_len=seq_len, store=None)
        frames.append(res.control.assign(value=float(value)))
    return pd.concat(frames, ignore_index=True)
