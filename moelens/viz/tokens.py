"""The token-coloured view: each token of a sequence coloured by its routing, one renderer for app and notebooks.

``token_html(tokens_df, routing_df, layer=...)`` returns a `TokenView`: self-contained HTML (inline CSS, no
JavaScript, no external assets) that Streamlit shows with ``st.html`` and Jupyter shows through
``_repr_html_``. Token text is rendered exactly as stored (multibyte characters, spaces and newlines kept,
everything HTML-escaped); hovering a token lists its top-k experts and gate weights at every recorded layer.
"""

from __future__ import annotations

import html
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from moelens.viz.palette import (
    DROPPED_COLOR,
    expert_color,
    label_color,
    rgba,
    text_color_for,
)

#: Views longer than this are cut (the view says so); a browser handles a few thousand spans fine.
MAX_TOKENS = 6000

_CSS = """
.moelens-tokens{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:14px;line-height:1.9;
  color:#111;background:#fff;padding:6px 4px;}
.moelens-tokens .ml-seq{margin:0 0 14px 0;}
.moelens-tokens .ml-seq-title{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;font-size:12px;
  color:#555;margin:2px 0 4px 0;}
.moelens-tokens .ml-text{white-space:pre-wrap;word-break:break-word;}
.moelens-tokens .ml-tok{position:relative;border-radius:3px;padding:1px 0;margin:0 1px 0 0;cursor:default;}
.moelens-tokens .ml-tok:hover{outline:2px solid #222;z-index:5;}
.moelens-tokens .ml-tok:hover::after{content:attr(data-tip);position:absolute;left:0;top:1.9em;z-index:10;
  white-space:pre;background:#222;color:#fff;font-size:12px;line-height:1.35;padding:6px 8px;border-radius:4px;
  box-shadow:0 2px 8px rgba(0,0,0,.3);pointer-events:none;min-width:12em;}
.moelens-tokens .ml-nl::before{content:"\\21B5";color:#999;font-size:11px;}
.moelens-tokens .ml-gen{text-decoration:underline dotted #333;text-underline-offset:3px;}
.moelens-tokens .ml-hl{box-shadow:0 0 0 2px #d00000 inset;}
.moelens-tokens .ml-drop{background:repeating-linear-gradient(45deg,#ddd,#ddd 3px,#f4f4f4 3px,#f4f4f4 6px);}
.moelens-tokens .ml-none{color:#888;}
.moelens-tokens .ml-legend{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;font-size:12px;
  color:#333;margin:0 0 8px 0;line-height:2;}
.moelens-tokens .ml-chip{display:inline-block;padding:0 6px;margin:0 4px 0 0;border-radius:3px;}
.moelens-tokens .ml-grad{display:inline-block;width:120px;height:10px;vertical-align:middle;margin:0 4px;
  border:1px solid #ccc;}
.moelens-tokens .ml-note{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;font-size:12px;color:#a15c00;}
"""

_SURROGATES = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _clean(text: str) -> str:
    """Text safe to put into UTF-8 HTML: lone surrogates -> U+FFFD; C0 controls -> their visible pictures."""
    text = _SURROGATES.sub("\ufffd", text)
    return _CONTROL.sub(lambda m: chr(0x2400 + ord(m.group())) if ord(m.group()) < 0x20 else "\u2421", text)


def _visible(text: str) -> str:
    """A one-line visible form of a token for tooltips (spaces and newlines shown)."""
    return _clean(text).replace("\n", "\u21b5").replace("\t", "\u21e5").replace(" ", "\u2423")


@dataclass
class TokenView:
    """Rendered token view. ``html`` is a fragment (with its own ``<style>``); ``to_html()`` a full page."""

    html: str
    n_tokens: int
    n_shown: int
    mode: str
    layer: int | None
    expert: int | None
    experts_shown: dict[int, int] = field(default_factory=dict)

    def _repr_html_(self) -> str:  # Jupyter / VS Code / st.html
        return self.html

    def __html__(self) -> str:  # Jinja / markupsafe
        return self.html

    def __str__(self) -> str:
        return self.html

    def to_html(self, title: str = "moelens tokens") -> str:
        """A standalone HTML document (UTF-8) with this view."""
        return (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head><body>\n{self.html}\n</body></html>\n"
        )

    def save(self, path: str | Path, title: str = "moelens tokens") -> Path:
        p = Path(path)
        p.write_text(self.to_html(title), encoding="utf-8")
        return p


def _tooltips(routing: pd.DataFrame, keys: list[str]) -> dict[tuple[int, int], str]:
    """Per token ``(seq_id, pos)``, one text line per layer: ``L3  E5 0.62 · E1 0.38`` (plain Python over numpy
    arrays: a sequence has at most a few thousand routing rows, and pandas string ops are slower here)."""
    if routing.empty:
        return {}
    seq = routing["seq_id"].to_numpy(np.int64)
    pos = routing["pos"].to_numpy(np.int64)
    layer = routing["layer"].to_numpy(np.int64)
    rank = routing["rank"].to_numpy(np.int64)
    expert = routing["expert"].to_numpy(np.int64)
    weight = pd.to_numeric(routing["weight"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    per_token: dict[tuple[int, int], dict[int, list[str]]] = {}
    for i in np.lexsort((rank, layer, pos, seq)):
        e, w = int(expert[i]), float(weight[i])
        slot = "dropped" if e < 0 else f"E{e}"
        if not np.isnan(w):
            slot += f" {w:.2f}"
            if w == 0:
                slot += " (not routed)"
        per_token.setdefault((int(seq[i]), int(pos[i])), {}).setdefault(int(layer[i]), []).append(slot)
    return {
        key: "\n".join(f"L{lay}  " + " · ".join(slots) for lay, slots in layers.items())
        for key, layers in per_token.items()
    }


def _top1(routing: pd.DataFrame, keys: list[str], layer: int) -> pd.Series:
    """Top-1 expert per token at ``layer``: the lowest-rank routed slot; -1 if the token was dropped."""
    r = routing[routing["layer"] == layer]
    if r.empty:
        return pd.Series(dtype="int64")
    routed = r[(r["weight"].isna()) | (r["weight"] != 0)]
    routed = routed.sort_values([*keys, "rank"]).drop_duplicates(keys, keep="first")
    # Prefer a real expert over a drop: a drop at rank 0 with another routed slot still counts as that slot.
    real = routed[routed["expert"] >= 0].set_index(keys)["expert"]
    drops = routed[routed["expert"] < 0].set_index(keys)["expert"]
    return pd.concat([real, drops[~drops.index.isin(real.index)]])


def token_html(
    tokens_df: pd.DataFrame,
    routing_df: pd.DataFrame,
    *,
    layer: int | None = None,
    color_by: str = "top1",
    expert: int | None = None,
    highlight: Collection[int] | Collection[tuple[int, int]] | None = None,
    seq_titles: Mapping[int, str] | None = None,
    labels: Mapping[int, str | None] | None = None,
    max_tokens: int = MAX_TOKENS,
    legend: bool = True,
) -> TokenView:
    """Render tokens coloured by routing.

    Parameters
    ----------
    tokens_df
        Columns ``pos`` and ``token`` (exact text), optionally ``seq_id``, ``token_id``, ``phase``.
    routing_df
        Columns ``pos, layer, rank, expert, weight`` (optionally ``seq_id``) for those tokens, as stored.
    layer
        The layer whose routing colours the tokens (default: the first layer in ``routing_df``).
    color_by
        ``"top1"``: background = colour of the token's top-1 expert at ``layer``;
        ``"weight"``: background = ``expert``'s colour with opacity = its gate weight at ``layer`` divided by
        the largest such weight in the view (0 if not selected; the legend gives the scale).
    highlight
        Positions (or ``(seq_id, pos)`` pairs) to outline, e.g. tokens whose routing or text differs.
    seq_titles, labels
        Optional caption and label per ``seq_id`` shown above each sequence.
    """
    if color_by not in ("top1", "weight"):
        raise ValueError(f"color_by must be 'top1' or 'weight', not {color_by!r}")
    if color_by == "weight" and expert is None:
        raise ValueError("color_by='weight' needs expert=<expert index>")
    missing = {"pos", "token"} - set(tokens_df.columns)
    if missing:
        raise ValueError(f"tokens_df lacks columns {sorted(missing)} (needs pos, token)")
    rmissing = {"pos", "layer", "rank", "expert", "weight"} - set(routing_df.columns)
    if rmissing:
        raise ValueError(f"routing_df lacks columns {sorted(rmissing)} (needs pos, layer, rank, expert, weight)")

    tokens = tokens_df.copy()
    if "seq_id" not in tokens.columns:
        tokens["seq_id"] = 0
    routing = routing_df.copy()
    if "seq_id" not in routing.columns:
        routing["seq_id"] = tokens["seq_id"].iloc[0] if len(tokens) else 0
    keys = ["seq_id", "pos"]
    n_total = len(tokens)
    tokens = tokens.sort_values(keys, kind="stable").head(max_tokens)
    if layer is None and not routing.empty:
        layer = int(routing["layer"].min())

    tips = _tooltips(routing, keys)
    hl: set[tuple[int, int]] = set()
    for h in highlight or ():
        if isinstance(h, tuple):
            hl.add((int(h[0]), int(h[1])))
        else:
            for s in tokens["seq_id"].unique():
                hl.add((int(s), int(h)))

    top1 = pd.Series(dtype="int64")
    weights = pd.Series(dtype="float64")
    wmax = 1.0
    if layer is not None and not routing.empty:
        if color_by == "top1":
            top1 = _top1(routing, keys, int(layer))
        else:
            sel = routing[(routing["layer"] == int(layer)) & (routing["expert"] == int(expert))]
            weights = sel.groupby(keys)["weight"].sum()
            if len(weights) and float(weights.max()) > 0:  # scaled to the data: small gate weights stay visible
                wmax = float(weights.max())

    tips_d = tips
    top1_d: dict = {(int(k[0]), int(k[1])): int(v) for k, v in top1.items()}
    w_d: dict = {(int(k[0]), int(k[1])): float(v) for k, v in weights.items()}
    counts: dict[int, int] = {}
    parts: list[str] = ['<div class="moelens-tokens">', f"<style>{_CSS}</style>"]
    legend_at = len(parts)
    ecol = expert_color(int(expert), layer) if expert is not None else None

    label_list = sorted({str(v) for v in (labels or {}).values() if v is not None})
    for seq_id, grp in tokens.groupby("seq_id", sort=True):
        sid = int(seq_id)
        parts.append(f'<div class="ml-seq" data-seq="{sid}">')
        title = (seq_titles or {}).get(sid)
        lab = (labels or {}).get(sid)
        if title is not None or lab is not None:
            chip = ""
            if lab is not None:
                c = label_color(lab, label_list)
                chip = (
                    f' <span class="ml-chip" style="background:{c};color:{text_color_for(c)}">'
                    f"{html.escape(_clean(str(lab)))}</span>"
                )
            parts.append(f'<div class="ml-seq-title">{html.escape(_clean(str(title or f"sequence {sid}")))}{chip}</div>')
        parts.append('<div class="ml-text">')
        for row in grp.itertuples(index=False):
            pos = int(row.pos)
            key = (sid, pos)
            text = row.token if isinstance(row.token, str) else None
            classes = ["ml-tok"]
            style = ""
            if key in top1_d:
                e = top1_d[key]
                counts[e] = counts.get(e, 0) + 1
                if e < 0:
                    classes.append("ml-drop")
                else:
                    bg = expert_color(e, layer)
                    style = f"background:{bg};color:{text_color_for(bg)}"
            elif ecol is not None and color_by == "weight":
                w = w_d.get(key, 0.0)
                if w > 0:
                    a = w / wmax
                    style = f"background:{rgba(ecol, a)};color:{text_color_for(ecol) if a > 0.6 else '#111'}"
            if getattr(row, "phase", None) == "generated":
                classes.append("ml-gen")
            if key in hl:
                classes.append("ml-hl")
            head = f"#{pos}"
            if text is not None:
                head += f"  {_visible(text)}"
            tid = getattr(row, "token_id", None)
            if tid is not None and pd.notna(tid):
                head += f"  id {int(tid)}"
            if getattr(row, "phase", None) == "generated":
                head += "  (generated)"
            if color_by == "weight" and expert is not None and layer is not None:
                w = w_d.get(key, 0.0)
                head += f"\nE{int(expert)} at L{int(layer)}: weight {w:.3f}"
            tip = head + ("\n" + tips_d[key] if key in tips_d else "\n(no routing recorded)")
            if text is None:
                shown = f"\u27e8{int(tid) if tid is not None and pd.notna(tid) else '?'}\u27e9"
                classes.append("ml-none")
            else:
                shown = html.escape(_clean(text), quote=False)
                if "\n" in text:
                    classes.append("ml-nl")
            parts.append(
                f'<span class="{" ".join(classes)}" data-pos="{pos}" style="{style}" '
                f'data-tip="{html.escape(_clean(tip), quote=True)}">{shown}</span>'
            )
        parts.append("</div></div>")
    if n_total > len(tokens):
        parts.append(f'<div class="ml-note">Showing the first {len(tokens):,} of {n_total:,} tokens.</div>')
    parts.append("</div>")

    if legend and layer is not None:
        if color_by == "top1":
            chips = []
            for e, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                bg = DROPPED_COLOR if e < 0 else expert_color(e, layer)
                name = "dropped" if e < 0 else f"E{e}"
                chips.append(
                    f'<span class="ml-chip" style="background:{bg};color:{text_color_for(bg)}">{name} · {n}</span>'
                )
            text = f"Top-1 expert at layer L{int(layer)} (tokens per expert): " + "".join(chips)
        else:
            text = (
                f"Gate weight of E{int(expert)} at layer L{int(layer)}: 0 "
                f'<span class="ml-grad" style="background:linear-gradient(90deg,{rgba(ecol, 0)},{rgba(ecol, 1)})">'
                f"</span> {wmax:.2f}"
            )
        parts.insert(legend_at, f'<div class="ml-legend">{text}</div>')

    return TokenView(
        html="".join(parts),
        n_tokens=n_total,
        n_shown=len(tokens),
        mode=color_by,
        layer=None if layer is None else int(layer),
        expert=None if expert is None else int(expert),
        experts_shown=counts,
    )
