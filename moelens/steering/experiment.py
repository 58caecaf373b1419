"""Steering experiments: the same inputs through the unmodified model, the steered model and random controls.

Why controls: any intervention on a model changes its outputs, so "disabling the math experts raised the math
loss" only means something next to "disabling as many random experts in the same layers raised it less".
`run_experiment` evaluates every variant on exactly the same token batches (teacher-forced), reports loss per
label, per-token log-prob deltas, the KL divergence of next-token distributions, and how many tokens changed
their top-k, and puts the steered effect next to the controls' mean and spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from moelens.adapters import MoEInfo, RoutingCapture, find_routers, unwrap
from moelens.errors import InputError, SteeringError
from moelens.recording.inputs import documents
from moelens.recording.record import pad_id, record, right_padded
from moelens.recording.tokenize import Chunk, chunk_documents
from moelens.steering.calibrate import calibrate_logit_std
from moelens.steering.context import steer
from moelens.steering.select import random_like
from moelens.steering.spec import SteeringSpec

STEERED = "steered"


@dataclass
class ExperimentResult:
    """Tidy results of `run_experiment`. Every frame has a ``variant`` column: ``steered`` or ``random:i``.

    * ``loss`` — per variant and label: ``n_tokens``, ``loss_base``, ``loss``, ``delta_loss`` (nats/token),
      ``ppl_base``, ``ppl``, ``kl`` (mean KL(base ‖ variant) of the next-token distributions);
    * ``tokens`` — per variant and predicted token: ``logprob_base``, ``logprob``, ``delta_logprob``, ``kl``;
    * ``routing`` — per variant, layer and label: ``share_changed``, the share of tokens whose set of routed
      experts differs from the baseline (weight-0 and capacity-dropped slots count as not routed), and
      ``experts_per_token``, the mean number of experts the variant routed each token to (its compute);
    * ``control`` — per label: the steered ``delta_loss`` against the random controls' mean and std, ``z`` and
      ``share_random_ge`` (how many controls raised the loss at least as much) and ``p_perm``, the one-sided
      Monte-Carlo permutation p-value (1 + #controls at least as large) / (1 + n_random) (Phipson & Smyth 2010,
      arXiv:1603.05766), which, unlike ``z``, assumes nothing about the controls' distribution;
    * ``generations`` — with ``generate``: per prompt, the baseline and steered continuations side by side.
    """

    spec: SteeringSpec
    controls: list[SteeringSpec]
    loss: pd.DataFrame
    tokens: pd.DataFrame
    routing: pd.DataFrame
    control: pd.DataFrame
    generations: pd.DataFrame | None = None
    baseline_run: int | None = None
    steered_run: int | None = None
    control_runs: list[int] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        """One row per label: baseline loss, steered and random effects, KL and the mean routing shift."""
        steered = self.loss[self.loss["variant"] == STEERED].set_index("label", drop=False)
        shift = (self.routing[self.routing["variant"] == STEERED].groupby("label", dropna=False)["share_changed"].mean())
        out = self.control.set_index("label", drop=False).join(
            steered[["n_tokens", "loss_base", "loss", "kl"]], how="left"
        )
        out["share_changed"] = shift.reindex(out.index).to_numpy()
        cols = ["label", "n_tokens", "loss_base", "loss", "delta_loss", "random_mean", "random_std", "n_random", "z",
                "p_perm", "share_random_ge", "kl", "share_changed"]
        return out.reset_index(drop=True)[cols]


def run_experiment(
    model: Any,
    tokenizer: Any,
    spec: SteeringSpec | dict | str,
    inputs: Any,
    *,
    store: Any = None,
    labels: Any = None,
    n_random: int = 5,
    seed: int = 0,
    generate: int | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    text_field: str = "text",
    label_field: str | None = "label",
    name: str | None = None,
    progress: bool = False,
) -> ExperimentResult:
    """Compare the baseline model, the model steered by ``spec`` and ``n_random`` random controls on ``inputs``.

    ``inputs`` and ``labels`` take the same forms as `moelens.record`. Controls are `random_like` ``spec`` with
    seeds ``seed, seed + 1, ...``. With ``store``, the baseline is recorded as a run and the steered model and
    every control as runs whose ``parent_run_id`` is the baseline's and whose ``intervention`` is their spec.
    With ``generate=N``, each input is also used as a prompt for N greedy new tokens, baseline vs steered.
    """
    module = unwrap(model)
    info = find_routers(module)
    if info.is_encoder_decoder:
        raise SteeringError("run_experiment compares next-token losses of decoder-only models; "
                            "use steer() directly for encoder-decoder models")
    spec = SteeringSpec.build(spec)
    docs = list(documents(inputs, labels if labels is None or isinstance(labels, str) else list(labels),
                          text_field=text_field, label_field=label_field))
    chunks = [c for c in chunk_documents(docs, tokenizer, seq_len) if len(c.ids) >= 2]
    if not chunks:
        raise InputError("nothing to evaluate: the inputs hold no sequence of at least 2 tokens")
    if spec.boost and spec.boost_unit == "std" and not spec.logit_std:
        spec = SteeringSpec.build(spec, logit_std=calibrate_logit_std(module, [torch.tensor([c.ids]) for c in chunks[:16]]))
    variants = {STEERED: spec, **{f"random:{i}": random_like(spec, info, seed + i) for i in range(n_random)}}

    frames = _evaluate(module, info, tokenizer, chunks, variants, batch_size, progress)
    frames["control"] = _none_for_missing_label(_control_table(frames["loss"]))
    result = ExperimentResult(spec=spec, controls=list(variants.values())[1:], **frames)
    if generate:
        result.generations = _generations(module, tokenizer, chunks, spec, generate)
    if store is not None:
        _record_runs(result, module, tokenizer, docs, variants, store=store, generate=generate,
                     batch_size=batch_size, seq_len=seq_len, name=name or spec.describe())
    return result


# -- evaluation ------------------------------------------------------------------------------------------


@dataclass
class _Pass:
    """One teacher-forced forward: next-token log-probs and the routed experts per layer."""

    log_probs: torch.Tensor  # [B, S-1, V]
    target: torch.Tensor  # [B, S-1] log-prob of the actual next token (CPU)
    routed: dict[int, torch.Tensor]  # layer -> [B*S, k] expert ids, -1 = not routed (weight 0 or dropped)


def _forward(module: Any, info: MoEInfo, ids: torch.Tensor, mask: torch.Tensor) -> _Pass:
    with RoutingCapture(module, info) as capture:
        logits = module(input_ids=ids, attention_mask=mask, use_cache=False).logits
        calls = capture.pop()
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu()
    return _Pass(log_probs, target, {c.layer: c.experts.masked_fill(c.weights == 0, -1) for c in calls})  # padding too


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows whose sets of routed experts differ (padded with -1 when a top_k override changed k)."""
    k = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(t, (0, k - t.shape[1]), value=-1).sort(dim=1).values for t in (a, b))
    return (a != b).any(dim=1)


def _batches(chunks: list[Chunk], batch_size: int, pad_id: int, device: torch.device):
    """``(first seq_id, chunks, ids [B, S], mask [B, S])`` of right-padded batches (real positions unchanged)."""
    for start in range(0, len(chunks), batch_size):
        batch = chunks[start:start + batch_size]
        ids, mask = right_padded(batch, pad_id)
        yield start, batch, ids.to(device), mask.to(device)


def _evaluate(module: Any, info: MoEInfo, tokenizer: Any, chunks: list[Chunk], variants: dict[str, SteeringSpec],
              batch_size: int, progress: bool) -> dict[str, pd.DataFrame]:
    """Every variant on every batch right after the baseline on it, so only one batch of logits is held."""
    token_parts: list[dict[str, np.ndarray]] = []
    routing_parts: list[dict[str, np.ndarray]] = []
    bar = tqdm(total=sum(len(c.ids) for c in chunks), unit="tok", unit_scale=True, desc="experiment",
               disable=not progress, dynamic_ncols=True)
    batches = _batches(chunks, batch_size, pad_id(tokenizer, module), next(module.parameters()).device)
    with torch.inference_mode():
        for start, batch, ids, mask in batches:
            base = _forward(module, info, ids, mask)
            base_p = base.log_probs.exp()
            seq_id = np.broadcast_to(np.arange(start, start + len(batch))[:, None], ids.shape)
            pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
            label = np.broadcast_to(np.array([c.label for c in batch], dtype=object)[:, None], ids.shape)
            real = mask.bool().cpu().numpy()
            predicted = real[:, 1:] & real[:, :-1]  # positions 1.. whose token and context are real
            for variant, spec in variants.items():
                with steer(module, spec):
                    run = _forward(module, info, ids, mask)
                kl = (base_p * (base.log_probs - run.log_probs)).sum(-1).cpu().numpy()
                token_parts.append({
                    "variant": np.full(int(predicted.sum()), variant, dtype=object),
                    "seq_id": seq_id[:, 1:][predicted],
                    "pos": pos[:, 1:][predicted],
                    "label": label[:, 1:][predicted],
                    "token_id": ids[:, 1:].cpu().numpy()[predicted],
                    "logprob_base": base.target.numpy()[predicted],
                    "logprob": run.target.numpy()[predicted],
                    "kl": kl[predicted],
                })
                for layer, experts in base.routed.items():
                    changed = _changed(experts, run.routed[layer]).numpy()[real.reshape(-1)]
                    routing_parts.append({
                        "variant": np.full(len(changed), variant, dtype=object),
                        "layer": np.full(len(changed), layer),
                        "label": label[real],
                        "changed": changed,
                        "n_experts": (run.routed[layer] >= 0).sum(1).numpy()[real.reshape(-1)],
                    })
            bar.update(int(real.sum()))
    bar.close()
    tokens = _concat(token_parts)
    tokens.insert(tokens.columns.get_loc("logprob") + 1, "delta_logprob", tokens["logprob"] - tokens["logprob_base"])
    routing = (
        _concat(routing_parts)
        .groupby(["variant", "layer", "label"], dropna=False, sort=False)
        .agg(n_tokens=("changed", "size"), share_changed=("changed", "mean"), experts_per_token=("n_experts", "mean"))
        .reset_index()
    )
    loss = _loss_table(tokens)
    return {name: _none_for_missing_label(df) for name, df in
            {"tokens": tokens, "routing": routing, "loss": loss}.items()}


def _concat(parts: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    return pd.DataFrame({key: np.concatenate([p[key] for p in parts]) for key in parts[0]})


def _none_for_missing_label(df: pd.DataFrame) -> pd.DataFrame:
    """Unlabelled inputs have label None (NULL), not the NaN that grouping leaves."""
    df["label"] = df["label"].astype(object).where(df["label"].notna(), None)
    return df


def _loss_table(tokens: pd.DataFrame) -> pd.DataFrame:
    loss = (
        tokens.groupby(["variant", "label"], dropna=False, sort=False)
        .agg(n_tokens=("logprob", "size"), loss_base=("logprob_base", "mean"), loss=("logprob", "mean"),
             kl=("kl", "mean"))
        .reset_index()
    )
    loss[["loss_base", "loss"]] *= -1
    loss.insert(loss.columns.get_loc("loss") + 1, "delta_loss", loss["loss"] - loss["loss_base"])
    loss.insert(loss.columns.get_loc("delta_loss") + 1, "ppl_base", np.exp(loss["loss_base"]))
    loss.insert(loss.columns.get_loc("ppl_base") + 1, "ppl", np.exp(loss["loss"]))
    return loss


def _control_table(loss: pd.DataFrame) -> pd.DataFrame:
    """Per label, the steered loss change against the random controls' (mean, std, z, share at least as large)."""
    rows = []
    for label, group in loss.groupby("label", dropna=False, sort=False):
        steered = float(group.loc[group["variant"] == STEERED, "delta_loss"].iloc[0])
        random = group.loc[group["variant"] != STEERED, "delta_loss"].to_numpy()
        std = float(random.std(ddof=1)) if len(random) > 1 else math.nan
        rows.append({
            "label": label,
            "delta_loss": steered,
            "random_mean": float(random.mean()) if len(random) else math.nan,
            "random_std": std,
            "n_random": len(random),
            "z": (steered - random.mean()) / std if len(random) > 1 and std > 0 else math.nan,
            "share_random_ge": float((random >= steered).mean()) if len(random) else math.nan,
            "p_perm": float((1 + (random >= steered).sum()) / (1 + len(random))) if len(random) else math.nan,
        })
    return pd.DataFrame(rows)


# -- generation and recording -------------------------------------------------------------------------------


def _generations(module: Any, tokenizer: Any, chunks: list[Chunk], spec: SteeringSpec, n_new: int) -> pd.DataFrame:
    """Greedy continuations of every input, without and with steering."""
    device = next(module.parameters()).device
    pad = pad_id(tokenizer, module)
    rows = []
    with torch.inference_mode():
        for seq_id, chunk in enumerate(chunks):
            prompt = torch.tensor([chunk.ids], device=device)
            kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, do_sample=False, pad_token_id=pad)
            base = module.generate(prompt, **kwargs)[0, len(chunk.ids):].tolist()
            with steer(module, spec):
                steered = module.generate(prompt, **kwargs)[0, len(chunk.ids):].tolist()
            rows.append({"seq_id": seq_id, "label": chunk.label, "prompt": _text(tokenizer, chunk.ids),
                         "baseline": _text(tokenizer, base), "steered": _text(tokenizer, steered),
                         "same": base == steered})
    return pd.DataFrame(rows)


def _record_runs(result: ExperimentResult, module: Any, tokenizer: Any, docs: list, variants: dict[str, SteeringSpec],
                 *, store: Any, generate: int | None, batch_size: int, seq_len: int, name: str) -> None:
    common = dict(store=store, generate=generate, batch_size=batch_size, seq_len=seq_len, progress=False)
    result.baseline_run = record(module, tokenizer, docs, name=f"baseline · {name}",
                                 metadata={"experiment": {"role": "baseline"}}, **common)
    for variant, spec in variants.items():
        with steer(module, spec):
            run = record(module, tokenizer, docs, name=f"{variant} · {spec.describe()}", parent_run_id=result.baseline_run,
                         intervention=spec.to_dict(), metadata={"experiment": {"role": variant}}, **common)
        if variant == STEERED:
            result.steered_run = run
        else:
            result.control_runs.append(run)


def _text(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
