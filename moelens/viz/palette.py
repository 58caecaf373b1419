"""One palette for the whole of moelens: an expert has the same colour in every figure, page and notebook.

Experts are identified per layer, ``(layer, expert)``, but the *colour* depends only on the expert index so
that "E5" reads the same across layers (the label always says which layer is meant). Labels (domains) get
their own qualitative palette, indexed by the sorted list of labels so a run's labels never collide.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Sequence

# 24 well-separated colours (Tableau 20 reordered for contrast between neighbours, plus 4 extras).
_EXPERT_BASE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#9edae5", "#dbdb8d", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
)  # fmt: skip

# Labels: a different qualitative set, so a label chip is not mistaken for an expert chip.
_LABEL_BASE: tuple[str, ...] = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac", "#86bcb6", "#d37295",
)  # fmt: skip

#: Colour of a capacity-dropped slot (expert -1) and of "no data".
DROPPED_COLOR = "#bdbdbd"
MISSING_COLOR = "#eeeeee"

#: Continuous scales (named plotly scales) used for shares/weights and for signed scores.
SEQUENTIAL_SCALE = "Viridis"
DIVERGING_SCALE = "RdBu_r"


def expert_color(expert: int) -> str:
    """The colour of expert index ``expert`` (hex). Same everywhere; -1 (dropped) is grey."""
    e = int(expert)
    if e < 0:
        return DROPPED_COLOR
    if e < len(_EXPERT_BASE):
        return _EXPERT_BASE[e]
    # Beyond the base set: golden-angle hues with alternating lightness, deterministic for any index.
    hue = ((e * 137.508) % 360) / 360
    light = (0.42, 0.58, 0.50)[e % 3]
    sat = (0.65, 0.55, 0.75)[(e // 3) % 3]
    r, g, b = colorsys.hls_to_rgb(hue, light, sat)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def expert_colors(n_experts: int) -> list[str]:
    """Colours of experts ``0 .. n_experts-1``."""
    return [expert_color(e) for e in range(int(n_experts))]


def label_color(label: str | None, labels: Sequence[str | None] | None = None) -> str:
    """Colour of a label. Pass the run's labels so colours follow their sorted order and never collide."""
    if label is None:
        return MISSING_COLOR
    if labels is not None:
        ordered = sorted({str(x) for x in labels if x is not None})
        if str(label) in ordered:
            return _LABEL_BASE[ordered.index(str(label)) % len(_LABEL_BASE)]
    # Stable (not Python's salted hash) fallback.
    h = sum((i + 1) * ord(c) for i, c in enumerate(str(label)))
    return _LABEL_BASE[h % len(_LABEL_BASE)]


def label_colors(labels: Iterable[str | None]) -> dict[str, str]:
    """``{label: colour}`` for a set of labels (sorted order)."""
    ordered = sorted({str(x) for x in labels if x is not None})
    return {lab: label_color(lab, ordered) for lab in ordered}


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    if len(c) == 3:
        c = "".join(ch * 2 for ch in c)
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def rgba(color: str, alpha: float) -> str:
    """``rgba(...)`` CSS for a hex colour at opacity ``alpha`` (clipped to [0, 1])."""
    r, g, b = hex_to_rgb(color)
    a = min(max(float(alpha), 0.0), 1.0)
    return f"rgba({r},{g},{b},{a:.3f})"


def text_color_for(background: str) -> str:
    """Black or white, whichever reads better on ``background`` (WCAG relative luminance)."""
    def channel(v: int) -> float:
        s = v / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = hex_to_rgb(background)
    lum = 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)
    return "#000000" if lum > 0.35 else "#ffffff"


def expert_name(expert: int, layer: int | None = None) -> str:
    """Readable name: ``E5`` or ``L2·E5``; ``dropped`` for -1."""
    if int(expert) < 0:
        return "dropped"
    return f"E{int(expert)}" if layer is None else f"L{int(layer)}·E{int(expert)}"


def layer_name(layer: int) -> str:
    return f"L{int(layer)}"
