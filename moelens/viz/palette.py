"""One palette for the whole of moelens: a unit ``(layer, expert)`` has the same colour in every figure, page
and notebook, and colours hold up from 8 to 256 experts.

The expert palette is 256 colours picked greedily so that each is as far as possible (in CIELAB, the space where
distance tracks perceived difference) from all before it: the first 8, 16, 64 colours are each the most distinct
set of that size the candidate grid holds (the idea of Glasbey et al., "Colour displays for categorical images",
2007). Experts are identified per layer, so the colour of E3 depends on its layer too: each layer reads the
palette from its own offset, and E3 in layer 1 and E3 in layer 2 get unrelated colours (the labels say which is
which). Labels (domains) get their own qualitative palette, indexed by the sorted list of labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

#: Size of the expert palette; with more experts per layer colours repeat (tooltips and labels still tell).
N_EXPERT_COLORS = 256
#: Palette offset between consecutive layer ids: coprime with 256, so layers start far apart in the palette.
LAYER_STRIDE = 67

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


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (rows) to CIELAB (D65)."""
    c = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.column_stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])])


@lru_cache(maxsize=1)
def _expert_palette() -> tuple[str, ...]:
    """`N_EXPERT_COLORS` colours, greedy max-min CIELAB distance over an sRGB grid (no near-whites or near-blacks,
    which vanish on a white page or under black text), starting from plotly's blue. Deterministic."""
    steps = np.linspace(0, 1, 16)
    grid = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    lab = _srgb_to_lab(grid)
    keep = (lab[:, 0] > 30) & (lab[:, 0] < 85)
    grid, lab = grid[keep], lab[keep]
    chosen = [int(np.argmin(((grid - np.array([0x1F, 0x77, 0xB4]) / 255) ** 2).sum(1)))]
    dist = np.linalg.norm(lab - lab[chosen[0]], axis=1)
    while len(chosen) < N_EXPERT_COLORS:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(lab - lab[nxt], axis=1))
    return tuple("#{:02x}{:02x}{:02x}".format(*(round(v * 255) for v in grid[i])) for i in chosen)


def expert_color(expert: int, layer: int | None = None) -> str:
    """The colour (hex) of expert ``expert`` of layer ``layer``; -1 (dropped) is grey. Without ``layer``, the
    colour of the expert index itself (for views that compare one index across layers on purpose)."""
    e = int(expert)
    if e < 0:
        return DROPPED_COLOR
    shift = 0 if layer is None else LAYER_STRIDE * int(layer)
    palette = _expert_palette()
    return palette[(e + shift) % len(palette)]


def expert_colors(n_experts: int, layer: int | None = None) -> list[str]:
    """Colours of experts ``0 .. n_experts-1`` (of ``layer``)."""
    return [expert_color(e, layer) for e in range(int(n_experts))]


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
