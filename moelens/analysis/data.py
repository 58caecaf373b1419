"""`RoutingData`: one run's routing as dense numpy arrays, the input of every score.

Why dense: the routing table is long (tokens × layers × k rows); every score is a per-layer reduction over
tokens, so a `[layer, token, rank]` array of expert ids lets each one be a handful of vectorised numpy calls
(bincount on combined keys, cumulative sums) instead of SQL group-bys or Python loops over rows.

Conventions:

* tokens are sorted by ``(seq_id, pos)``; the unit of every score is ``(layer, expert)`` with the model's own
  layer ids;
* ``experts[l, t, r] == -1`` means "not routed": a capacity-dropped token, a weight-0 slot, or a rank slot a
  layer with a smaller k does not have. Such tokens still count in token totals;
* rank slots keep the stored order (descending gate weight), which first-choice scores and SCH/LRU rely on;
* missing values are ``-1`` for ids (token, prediction, label) and NaN for weights and gates, never 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moelens.errors import InputError

#: Phase codes used in `RoutingData.phase` (``-1`` = unknown).
PHASES: tuple[str, ...] = ("prompt", "generated")


@dataclass(frozen=True)
class Origin:
    """Where a `RoutingData` was loaded from, so token text and router logits can be fetched on demand."""

    path: Path
    run_id: int
    phase: str | None


@dataclass(frozen=True, eq=False)
class RoutingData:
    """Dense routing of one run (optionally one phase). Build it with `from_store`, `from_arrays` or
    `moelens.analysis.synthetic`; do not mutate it (loaded runs are cached and shared)."""

    experts: np.ndarray  #: int16[L, T, K]; -1 = not routed
    weights: np.ndarray  #: float32[L, T, K]; 0 where not routed, NaN if the weight was not recorded
    layer_ids: np.ndarray  #: int32[L], the model's own layer indices, ascending
    n_experts: np.ndarray  #: int32[L], routed experts per layer (E)
    top_k: np.ndarray  #: int32[L], experts per token per layer (k)
    seq_id: np.ndarray  #: int32[T]
    pos: np.ndarray  #: int32[T]
    token_id: np.ndarray  #: int32[T]; -1 unknown
    predicted_id: np.ndarray  #: int32[T]; -1 unknown
    phase: np.ndarray  #: int8[T]; index into PHASES, -1 unknown
    label: np.ndarray  #: int32[T]; index into label_names, -1 = unlabelled
    label_names: tuple[str, ...]
    shared_gate: np.ndarray | None = None  #: float32[L, T]; NaN where a layer has no shared-expert gate
    phase_filter: str | None = None  #: the phase this data was restricted to (None = all tokens pooled)
    origin: Origin | None = None
    _lazy: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        experts: Any,
        weights: Any = None,
        *,
        n_experts: int | Sequence[int],
        layer_ids: Sequence[int] | None = None,
        top_k: int | Sequence[int] | None = None,
        seq_id: Any = None,
        pos: Any = None,
        token_id: Any = None,
        predicted_id: Any = None,
        phase: Sequence[str | None] | None = None,
        labels: Sequence[str | None] | None = None,
        token_text: Sequence[str] | None = None,
        shared_gate: Any = None,
        router_logits: Mapping[int, Any] | None = None,
    ) -> RoutingData:
        """Build from plain arrays (tests, synthetic traces, routing captured elsewhere).

        ``experts`` is ``[L, T, K]`` (or ``[T, K]`` for one layer) in rank order with -1 for "not routed";
        ``weights`` the same shape (default: ``1/k`` on routed slots); a weight of 0 marks a slot as not
        routed. Tokens must be sorted by ``(seq_id, pos)``; defaults are one sequence with positions 0..T-1.
        ``labels`` and ``phase`` are per token (None = missing); ``router_logits`` maps a layer id to
        ``float[T, E]``.
        """
        exp = np.asarray(experts)
        if exp.ndim == 2:
            exp = exp[None]
        if exp.ndim != 3:
            raise InputError(f"experts must be [layers, tokens, k] or [tokens, k], got shape {exp.shape}")
        n_layers, n_tok, k = exp.shape
        if weights is None:
            w = np.where(exp >= 0, 1.0 / max(k, 1), 0.0).astype(np.float32)
        else:
            w = np.array(weights, dtype=np.float32).reshape(exp.shape)
        ids = np.arange(n_layers) if layer_ids is None else np.asarray(layer_ids)
        n_exp = np.broadcast_to(np.asarray(n_experts, dtype=np.int32), (n_layers,)).copy()
        kk = np.broadcast_to(np.asarray(k if top_k is None else top_k, dtype=np.int32), (n_layers,)).copy()
        seq = np.zeros(n_tok, np.int32) if seq_id is None else np.asarray(seq_id, dtype=np.int32)
        if pos is None:
            starts = np.r_[0, np.flatnonzero(np.diff(seq)) + 1]
            p = np.arange(n_tok) - np.repeat(starts, np.diff(np.r_[starts, n_tok]))
        else:
            p = np.asarray(pos)
        names, codes = _factorize(labels, n_tok)
        data = cls(
            experts=exp.astype(np.int16),
            weights=w,
            layer_ids=ids.astype(np.int32),
            n_experts=n_exp,
            top_k=kk,
            seq_id=seq,
            pos=p.astype(np.int32),
            token_id=_ids(token_id, n_tok),
            predicted_id=_ids(predicted_id, n_tok),
            phase=_phase_codes(phase, n_tok),
            label=codes,
            label_names=names,
            shared_gate=None if shared_gate is None else np.asarray(shared_gate, np.float32).reshape(n_layers, n_tok),
        )
        if token_text is not None:
            data._lazy["text"] = np.asarray(token_text, dtype=object)
        if router_logits is not None:
            data._lazy["logits"] = {int(layer): np.asarray(v, np.float32) for layer, v in router_logits.items()}
        data._validate()
        data.freeze()
        return data

    @classmethod
    def from_store(cls, store: Any, run_id: int, *, phase: str | None = None) -> RoutingData:
        """Load the whole run ``run_id`` of a `TraceStore` (cached by its completion time, so a second call on a
        completed run is free). Scores stream a run in batches instead; this is for small runs and views."""
        from moelens.analysis.loading import load_run

        return load_run(store, run_id, phase=phase)

    def _validate(self) -> None:
        """Weight-0 and out-of-k slots become -1 (not routed); check shapes, id ranges and token order.

        Mutates only arrays that `from_arrays` just copied; the store loader builds valid arrays itself.
        """
        L, T, K = self.experts.shape
        if self.weights.shape != (L, T, K):
            raise InputError(f"weights shape {self.weights.shape} differs from experts shape {self.experts.shape}")
        for name in ("seq_id", "pos", "token_id", "predicted_id", "phase", "label"):
            if getattr(self, name).shape != (T,):
                raise InputError(f"{name} must have one value per token ({T}), got shape {getattr(self, name).shape}")
        if len(self.layer_ids) != L or np.any(np.diff(self.layer_ids) <= 0):
            raise InputError(f"layer_ids must be {L} distinct ascending ids, got {list(self.layer_ids)}")
        mark_not_routed(self.experts, self.weights)
        for li in range(L):
            self.experts[li, :, self.top_k[li] :] = -1
            top = int(self.experts[li].max(initial=-1))
            if top >= self.n_experts[li]:
                raise InputError(f"layer {self.layer_ids[li]}: expert id {top} >= n_experts {self.n_experts[li]}")
        if K > 1:
            srt = np.sort(self.experts, axis=-1)
            if np.any((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)):
                raise InputError("a token selects the same expert twice in one layer")
        key = self.seq_id.astype(np.int64) * 2**32 + self.pos
        if T and (np.any(np.diff(key) <= 0) or self.pos.min() < 0):
            raise InputError("tokens must be sorted by (seq_id, pos) with unique, non-negative positions")
        if self.shared_gate is not None and self.shared_gate.shape != (L, T):
            raise InputError(f"shared_gate must be [layers, tokens] = {(L, T)}")

    def freeze(self) -> RoutingData:
        """Make every array read-only (cached runs are shared between callers) and return self."""
        for value in vars(self).values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
        return self

    # -- shape ---------------------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return self.experts.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.experts.shape[1]

    @property
    def k_max(self) -> int:
        return self.experts.shape[2]

    def layer_index(self, layer: int) -> int:
        """Position of a model layer id in the arrays (raises with the valid ids)."""
        hits = np.flatnonzero(self.layer_ids == layer)
        if not len(hits):
            raise InputError(f"no MoE layer {layer} in this run; layers are {self.layer_ids.tolist()}")
        return int(hits[0])

    # -- token structure -----------------------------------------------------------------------------

    @cached_property
    def segment_starts(self) -> np.ndarray:
        """int64[S+1] bounds of runs of consecutive tokens (same sequence, pos + 1): the spans inside which
        windows and consecutive pairs are taken (a phase filter or a gap splits a sequence)."""
        if self.n_tokens == 0:
            return np.zeros(1, np.int64)
        return np.r_[0, np.flatnonzero(~self.next_is_consecutive) + 1, self.n_tokens].astype(np.int64)

    @cached_property
    def next_is_consecutive(self) -> np.ndarray:
        """bool[T-1]: token t+1 directly follows token t in the same sequence."""
        return (self.seq_id[1:] == self.seq_id[:-1]) & (self.pos[1:] == self.pos[:-1] + 1)

    def index_of(self, seq_id: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Token indices of ``(seq_id, pos)`` pairs; -1 where the token is not in this data."""
        key = self.seq_id.astype(np.int64) * 2**32 + self.pos
        want = np.asarray(seq_id, np.int64) * 2**32 + np.asarray(pos, np.int64)
        idx = np.searchsorted(key, want)
        found = idx < len(key)
        found[found] = key[idx[found]] == want[found]
        return np.where(found, idx, -1)

    def select(self, mask: np.ndarray, *, phase_filter: str | None = None) -> RoutingData:
        """A new `RoutingData` with only the tokens where ``mask`` is True (text/logits stay available)."""
        idx = np.flatnonzero(mask)
        sub = replace(
            self,
            experts=self.experts[:, idx],
            weights=self.weights[:, idx],
            seq_id=self.seq_id[idx],
            pos=self.pos[idx],
            token_id=self.token_id[idx],
            predicted_id=self.predicted_id[idx],
            phase=self.phase[idx],
            label=self.label[idx],
            shared_gate=None if self.shared_gate is None else self.shared_gate[:, idx],
            phase_filter=phase_filter if phase_filter is not None else self.phase_filter,
            _lazy={},
        )
        sub._lazy["parent"] = (self, idx)
        return sub.freeze()

    # -- optional columns, loaded on first use -------------------------------------------------------

    def token_text(self) -> np.ndarray:
        """object[T] token strings (exact spans); ``str(token_id)`` where the text is unknown."""
        if "text" not in self._lazy:
            self._lazy["text"] = self._derive("text", lambda d: d.token_text(), self._load_text)
        return self._lazy["text"]

    def router_logits(self, layer: int) -> np.ndarray | None:
        """float32[T, E] router logits of one layer (NaN rows for tokens without them), or None if the run
        has none recorded for that layer."""
        cache = self._lazy.setdefault("logits_by_layer", {})
        if layer not in cache:
            if "logits" in self._lazy:
                cache[layer] = self._lazy["logits"].get(layer)
            else:
                cache[layer] = self._derive("logits", lambda d: d.router_logits(layer), lambda: self._load_logits(layer))
        return cache[layer]

    def _derive(self, what: str, from_parent: Callable[[RoutingData], Any], load: Callable[[], Any]) -> Any:
        if "parent" in self._lazy:
            parent, idx = self._lazy["parent"]
            value = from_parent(parent)
            return None if value is None else value[idx]
        if self.origin is not None:
            return load()
        if what == "text":
            return self.token_id.astype(str).astype(object)
        return None

    def _load_text(self) -> np.ndarray:
        from moelens.analysis.loading import load_token_text

        return load_token_text(self)

    def _load_logits(self, layer: int) -> np.ndarray | None:
        from moelens.analysis.loading import load_router_logits

        return load_router_logits(self, layer)


def _ids(values: Any, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, -1, np.int32)
    return np.asarray(values, dtype=np.int32)


def _phase_codes(values: Sequence[str | None] | None, n: int) -> np.ndarray:
    if values is None:
        return np.zeros(n, np.int8)
    given = pd.Series(list(values), dtype=object)
    codes = pd.Categorical(given, categories=list(PHASES)).codes
    bad = (codes < 0) & given.notna().to_numpy()
    if bad.any():
        raise InputError(f"phase must be one of {PHASES} or None, got {given[bad].iloc[0]!r}")
    return codes.astype(np.int8)


def mark_not_routed(experts: np.ndarray, weights: np.ndarray) -> None:
    """In place: a weight-0 slot counts as not routed (expert -1), and a not-routed slot has weight 0."""
    not_routed = (weights == 0) | (experts < 0)
    experts[not_routed] = -1
    weights[not_routed] = 0


def _factorize(labels: Sequence[str | None] | None, n: int) -> tuple[tuple[str, ...], np.ndarray]:
    """Sorted label names and int32 codes (-1 = no label)."""
    if labels is None:
        return (), np.full(n, -1, np.int32)
    cat = pd.Categorical(list(labels))
    return tuple(str(c) for c in cat.categories), cat.codes.astype(np.int32)
