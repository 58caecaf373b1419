"""`SteeringSpec`: what to change in a model's routing, as plain data (no torch).

A spec is stored with every steered run (``runs.intervention``), written to files for the CLI and shown in the
app, so it must round-trip through JSON exactly and must not need a model to be read. Checking it against a
model (do the layers and experts exist?) happens when it is applied (`moelens.steering.steer`).

Pairs are ``(layer, expert)`` with the model's own layer index (DESIGN.md: never pool an expert across layers).
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
      values suppress. The same offset means very different things in different models (transformers-moe.md
      §6.5), hence the ``std`` unit, which needs ``logit_std`` (see `moelens.steering.calibrate_logit_std`).
    * ``gate_scale`` — multiply the gate weight an already selected expert gets by β, at the experts' inputs,
      without renormalising (RICE, arXiv 2505.14681). Selection is unchanged.
    * ``top_k`` — experts per token for a layer, where the router reads its ``top_k`` at call time.

    Constructor arguments are normalised (pairs sorted, mappings frozen into tuples), so two specs that mean the
    same compare equal and serialise to the same JSON.
    """

    disable: tuple[Pair, ...] = ()
    force: tuple[Pair, ...] = ()
    boost: tuple[tuple[Pair, float], ...] = ()
    boost_unit: str = "logit"
    gate_scale: tuple[tuple[Pair, float], ...] = ()
    top_k: tuple[tuple[int, int], ...] = ()
    mode: str = "reroute"
    logit_std: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "disable", _pairs(self.disable))
        set_(self, "force", _pairs(self.force))
        set_(self, "boost", _pair_values(self.boost, "boost"))
        set_(self, "gate_scale", _pair_values(self.gate_scale, "gate_scale"))
        set_(self, "top_k", tuple(sorted((int(layer), int(k)) for layer, k in dict(self.top_k).items())))
        set_(self, "logit_std", tuple(sorted((int(layer), float(s)) for layer, s in dict(self.logit_std).items())))
        if self.mode not in MODES:
            raise SteeringError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.boost_unit not in BOOST_UNITS:
            raise SteeringError(f"boost_unit must be one of {BOOST_UNITS}, not {self.boost_unit!r}")
        both = set(self.disable) & set(self.force)
        if both:
            raise SteeringError(f"experts both disabled and forced: {_fmt(sorted(both))}")
        bad_k = [(layer, k) for layer, k in self.top_k if k < 1]
        if bad_k:
            raise SteeringError(f"top_k must be at least 1, got {dict(bad_k)}")

    # -- views -------------------------------------------------------------------------------------------

    @property
    def is_empty(self) -> bool:
        return not (self.disable or self.force or self.boost or self.gate_scale or self.top_k)

    def pairs(self) -> set[Pair]:
        """Every (layer, expert) the spec touches."""
        return {*self.disable, *self.force, *(p for p, _ in self.boost), *(p for p, _ in self.gate_scale)}

    def layers(self) -> set[int]:
        return {layer for layer, _ in self.pairs()} | {layer for layer, _ in self.top_k}

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
        if self.top_k:
            parts.append("top_k " + " ".join(f"L{l}={k}" for l, k in self.top_k))
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
        for key in ("top_k", "logit_std"):
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
                                "mode, boost_unit or logit_std")
        return cls(**{**base, **kwargs})


def _fmt(pairs: Iterable[Pair]) -> str:
    return " ".join(f"{layer}:{expert}" for layer, expert in pairs)
