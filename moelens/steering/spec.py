"""`SteeringSpec`: what to change in a model's routing, as plain data (no torch).

A spec is stored with every steered run (``runs.intervention``), written to files for the CLI and shown in the
app, so it must round-trip through JSON exactly and must not need a model to be read. Checking it against a
model (do the layers and experts exist?) happens when it is applied (`moelens.steering.steer`).

Pairs are ``(layer, expert)`` with the model's own layer index (an expert is never pooled across layers).
In JSON a pair is ``[layer, expert]``; hand-written files may also use the CLI's ``"L:E"`` strings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from moelens.errors import SteeringError

Pair = tuple[int, int]

#: Where a disable acts. ``reroute``: the expert's logit is set to -inf before the model's own top-k, so the
#: token picks its next-best expert (MoTE/SteerMoE style). ``zero``: the model routes as usual and the expert's
#: gate weight is set to 0 at the experts' inputs (ablation without rerouting; the other weights stay as they are).
MODES = ("reroute", "zero")
#: Units of a boost: raw logits, or multiples of each layer's router-logit standard deviation (`logit_std`).
BOOST_UNITS = ("logit", "std")
SPEC_VERSION = 1
#: Layer key of a ``top_k`` / ``top_p`` / ``k_max`` value that applies to every MoE layer (``top_k=2``); a value
#: given for one layer overrides it there. In JSON: ``[[-1, 2]]`` or simply ``2``.
ALL_LAYERS = -1


def parse_pair(text: str) -> Pair:
    """``"L:E"`` -> ``(L, E)``; the notation of the CLI and of hand-written spec files."""
    layer, sep, expert = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        return int(layer), int(expert)
    except ValueError:
        raise SteeringError(f"expected LAYER:EXPERT such as 3:17, got {text!r}") from None


def parse_pair_value(text: str) -> tuple[Pair, float]:
    """``"L:E=V"`` -> ``((L, E), V)``, for boosts and gate scales on the command line."""
    pair, sep, value = str(text).partition("=")
    try:
        if not sep:
            raise ValueError
        return parse_pair(pair), float(value)
    except ValueError:
        raise SteeringError(f"expected LAYER:EXPERT=VALUE such as 3:17=2.5, got {text!r}") from None


def _pair(item: Any) -> Pair:
    if isinstance(item, str):
        return parse_pair(item)
    try:
        layer, expert = item
        return int(layer), int(expert)
    except (TypeError, ValueError):
        raise SteeringError(f"expected a (layer, expert) pair, got {item!r}") from None


def _per_layer(value: Any, cast: type, what: str) -> tuple[tuple[int, Any], ...]:
    """A number (every layer), ``{layer: value}`` or ``[[layer, value], ...]`` -> sorted ``((layer, value), ...)``."""
    if value is None or value == ():
        return ()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {ALL_LAYERS: value}
    try:
        rows = value.items() if isinstance(value, Mapping) else (tuple(row) for row in value)
        return tuple(sorted((int(layer), cast(v)) for layer, v in dict(rows).items()))
    except (TypeError, ValueError):
        raise SteeringError(f"{what} must be a number or {{layer: value}}, got {value!r}") from None


def _pairs(items: Iterable[Any]) -> tuple[Pair, ...]:
    return tuple(sorted({_pair(item) for item in items}))


def _pair_values(items: Mapping[Any, Any] | Iterable[Any], what: str) -> tuple[tuple[Pair, float], ...]:
    """A mapping ``{pair: value}`` or JSON rows ``[[layer, expert, value], ...]`` -> sorted ``((pair, value), ...)``."""
    rows = items.items() if isinstance(items, Mapping) else ((row[:2] if len(row) == 3 else row[0], row[-1]) for row in items)
    out: dict[Pair, float] = {}
    for key, value in rows:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise SteeringError(f"{what} values must be numbers, got {value!r} for {key!r}") from None
        if not math.isfinite(value):
            raise SteeringError(f"{what} values must be finite numbers, got {value} for {key!r}")
        out[_pair(key)] = value
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SteeringSpec:
    """One intervention on a model's routing; every field is optional and an empty spec changes nothing.

    * ``disable`` — never route these experts (``mode`` says how, see `MODES`).
    * ``force`` — route these experts for every token (logit +1e4 before the model's own top-k; at most k per layer).
    * ``boost`` — add ``value`` to the expert's router logit before top-k, in ``boost_unit`` units; negative
      values suppress. The same offset means very different things in different models, hence the ``std`` unit, which needs ``logit_std`` (see `moelens.steering.calibrate_logit_std`).
    * ``gate_scale`` — multiply the gate weight an already selected expert gets by β, at the experts' inputs,
      without renormalising (RICE, arXiv 2505.14681). Selection is unchanged.
    * ``top_k`` — experts per token, for every layer (``top_k=2``) or per layer (``{layer: k}``), with the
      architecture's own routing function (renormalised as the model does); refused where k is fixed by
      construction (PhiMoE, Switch, JetMoE's attention experts).
    * ``top_p`` / ``k_max`` — dynamic routing (Huang et al. 2024, arXiv:2403.07652): each token takes the smallest
      set of experts, in the router's own order, whose probability mass reaches p, at most ``k_max`` (default E),
      weighted as the model weights its selection. Global or per layer like ``top_k``.
    * ``only_rank`` — route each token to one expert only: the one its router ranks r-th (1 = its first choice),
      weighted as the model weights a one-expert selection. The "weak" model of SCMoE self-contrast decoding
      (Shi et al. 2024, arXiv:2405.14507). Global or per layer. A layer takes one of top_k, top_p, only_rank.

    Constructor arguments are normalised (pairs sorted, mappings frozen into tuples), so two specs that mean the
    same compare equal and serialise to the same JSON.
    """

    disable: tuple[Pair, ...] = ()
    force: tuple[Pair, ...] = ()
    boost: tuple[tuple[Pair, float], ...] = ()
    boost_unit: str = "logit"
    gate_scale: tuple[tuple[Pair, float], ...] = ()
    top_k: tuple[tuple[int, int], ...] = ()
    top_p: tuple[tuple[int, float], ...] = ()
    k_max: tuple[tuple[int, int], ...] = ()
    only_rank: tuple[tuple[int, int], ...] = ()
    mode: str = "reroute"
    logit_std: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "disable", _pairs(self.disable))
        set_(self, "force", _pairs(self.force))
        set_(self, "boost", _pair_values(self.boost, "boost"))
        set_(self, "gate_scale", _pair_values(self.gate_scale, "gate_scale"))
        set_(self, "top_k", _per_layer(self.top_k, int, "top_k"))
        set_(self, "top_p", _per_layer(self.top_p, float, "top_p"))
        set_(self, "k_max", _per_layer(self.k_max, int, "k_max"))
        set_(self, "only_rank", _per_layer(self.only_rank, int, "only_rank"))
        set_(self, "logit_std", tuple(sorted((int(layer), float(s)) for layer, s in dict(self.logit_std).items())))
        if self.mode not in MODES:
            raise SteeringError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.boost_unit not in BOOST_UNITS:
            raise SteeringError(f"boost_unit must be one of {BOOST_UNITS}, not {self.boost_unit!r}")
        both = set(self.disable) & set(self.force)
        if both:
            raise SteeringError(f"experts both disabled and forced: {_fmt(sorted(both))}")
        bad_k = [(layer, k) for layer, k in (*self.top_k, *self.k_max, *self.only_rank) if k < 1]
        if bad_k:
            raise SteeringError(f"top_k, k_max and only_rank must be at least 1, got {dict(bad_k)}")
        bad_p = [(layer, p) for layer, p in self.top_p if not 0.0 < p <= 1.0]
        if bad_p:
            raise SteeringError(f"top_p must be in (0, 1], got {dict(bad_p)}")
        seen: dict[int, str] = {}
        for name, values in (("top_k", self.top_k), ("top_p", self.top_p), ("only_rank", self.only_rank)):
            for layer, _ in values:
                if layer in seen:
                    raise SteeringError(f"layer {layer} (-1 = every layer) takes one of top_k, top_p and only_rank, "
                                        f"not both {seen[layer]} and {name}")
                seen[layer] = name
        if self.k_max and not self.top_p:
            raise SteeringError("k_max caps top_p routing; pass top_p too (or use top_k for a fixed k)")

    def experts_per_token(self, layer: int) -> tuple[str, float, int | None] | None:
        """``("k", k, None)``, ``("p", p, k_max)``, ``("rank", r, None)`` or None: how ``layer`` chooses its
        experts under this spec (a value for the layer itself wins over an every-layer one)."""
        cap = dict(self.k_max).get(layer, dict(self.k_max).get(ALL_LAYERS))
        for key in (layer, ALL_LAYERS):
            for how, values in (("k", self.top_k), ("p", self.top_p), ("rank", self.only_rank)):
                if key in dict(values):
                    return how, dict(values)[key], cap if how == "p" else None
        return None

    # -- views -------------------------------------------------------------------------------------------

    @property
    def is_empty(self) -> bool:
        return not (self.disable or self.force or self.boost or self.gate_scale or self.top_k or self.top_p
                    or self.only_rank)

    def pairs(self) -> set[Pair]:
        """Every (layer, expert) the spec touches."""
        return {*self.disable, *self.force, *(p for p, _ in self.boost), *(p for p, _ in self.gate_scale)}

    def layers(self) -> set[int]:
        per_layer = {layer for layer, _ in (*self.top_k, *self.top_p, *self.k_max, *self.only_rank)} - {ALL_LAYERS}
        return {layer for layer, _ in self.pairs()} | per_layer

    def describe(self) -> str:
        """One line for tables and logs, e.g. ``disable 1:3 2:5 · boost 0:1=+2std``."""
        parts = []
        if self.disable:
            parts.append(("zero " if self.mode == "zero" else "disable ") + _fmt(self.disable))
        if self.force:
            parts.append("force " + _fmt(self.force))
        if self.boost:
            unit = "std" if self.boost_unit == "std" else ""
            parts.append("boost " + " ".join(f"{l}:{e}={v:+g}{unit}" for (l, e), v in self.boost))
        if self.gate_scale:
            parts.append("gate_scale " + " ".join(f"{l}:{e}x{v:g}" for (l, e), v in self.gate_scale))
        for name, values in (("top_k", self.top_k), ("top_p", self.top_p), ("k_max", self.k_max),
                             ("only_rank", self.only_rank)):
            if values:
                parts.append(name + " " + " ".join(f"{v:g}" if l == ALL_LAYERS else f"L{l}={v:g}" for l, v in values))
        return " · ".join(parts) or "no change"

    # -- JSON ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: pairs as ``[layer, expert]``, valued pairs as ``[layer, expert, value]``."""
        return {
            "version": SPEC_VERSION,
            "disable": [list(p) for p in self.disable],
            "force": [list(p) for p in self.force],
            "boost": [[l, e, v] for (l, e), v in self.boost],
            "boost_unit": self.boost_unit,
            "gate_scale": [[l, e, v] for (l, e), v in self.gate_scale],
            "top_k": [[l, k] for l, k in self.top_k],
            "top_p": [[l, p] for l, p in self.top_p],
            "k_max": [[l, k] for l, k in self.k_max],
            "only_rank": [[l, r] for l, r in self.only_rank],
            "mode": self.mode,
            "logit_std": [[l, s] for l, s in self.logit_std],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SteeringSpec:
        """Inverse of `to_dict`; also accepts ``"L:E"`` strings and ``{"L:E": value}`` / ``{layer: k}`` mappings."""
        data = dict(data)
        version = data.pop("version", SPEC_VERSION)
        if version > SPEC_VERSION:
            raise SteeringError(f"steering spec version {version} is newer than this moelens understands ({SPEC_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SteeringError(f"unknown steering spec fields {unknown}; known: {sorted(known)}")
        for key in ("top_k", "top_p", "k_max", "only_rank", "logit_std"):
            if isinstance(data.get(key), (int, float)) and key != "logit_std":
                continue  # a bare number: every layer
            if key in data and not isinstance(data[key], Mapping):
                data[key] = {int(row[0]): row[1] for row in data[key]}
            elif key in data:
                data[key] = {int(k): v for k, v in data[key].items()}
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> SteeringSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SteeringError(f"steering spec is not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise SteeringError("a steering spec is a JSON object, e.g. {\"disable\": [[1, 3]]}")
        return cls.from_dict(data)

    @classmethod
    def build(cls, spec: SteeringSpec | Mapping[str, Any] | str | None = None, **kwargs: Any) -> SteeringSpec:
        """A spec from a spec, a dict, a JSON string or keyword arguments; keywords override fields of ``spec``."""
        if isinstance(spec, str):
            spec = cls.from_json(spec)
        elif isinstance(spec, Mapping):
            spec = cls.from_dict(spec)
        base = {} if spec is None else {f.name: getattr(spec, f.name) for f in fields(cls)}
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise SteeringError(f"unknown steering arguments {unknown}; use disable, force, boost, gate_scale, top_k, "
                                "top_p, k_max, only_rank, mode, boost_unit or logit_std")
        return cls(**{**base, **kwargs})


def _fmt(pairs: Iterable[Pair]) -> str:
    return " ".join(f"{layer}:{expert}" for layer, expert in pairs)
