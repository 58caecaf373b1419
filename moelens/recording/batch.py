"""Turn decoded router calls into the store's columns (numpy), dropping padding and fixing rank order.

Kept free of hooks and I/O so it can be tested on its own: given the calls of one forward (or one
generation) and which sequence/position each call row belongs to, produce `routing`, `shared_experts`
and `router_logits` rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from moelens.adapters.routing import padding_slots


@dataclass
class RowMap:
    """Where the flattened token rows of one unit of work (a padded batch, or one generation) belong.

    ``seq_id[i]`` and ``pos[i]`` locate row ``i``; ``keep[i]`` is False for padding. Router calls of one
    layer consume rows in order (a forward uses all rows at once; generation uses the prompt rows and then
    one row per step), tracked per layer by ``offsets``.
    """

    seq_id: np.ndarray
    pos: np.ndarray
    keep: np.ndarray
    offsets: dict[int, int] = field(default_factory=dict)

    def take(self, layer: int, n_rows: int) -> slice:
        start = self.offsets.get(layer, 0)
        if start + n_rows > len(self.seq_id):
            raise RuntimeError(
                f"layer {layer} routed {start + n_rows} token rows but the input has {len(self.seq_id)}; "
                "was the model called more than once per recorded forward?"
            )
        self.offsets[layer] = start + n_rows
        return slice(start, start + n_rows)

    def check_complete(self, layers: Sequence[int]) -> None:
        """Every expected MoE layer must have routed every row (a silently unhooked layer is a bug)."""
        missing = [layer for layer in layers if self.offsets.get(layer, 0) != len(self.seq_id)]
        if missing:
            seen = {layer: self.offsets.get(layer, 0) for layer in missing}
            raise RuntimeError(f"routing incomplete for layers {missing}: rows seen {seen} of {len(self.seq_id)}")


def forward_rows(seq_start: int, mask: np.ndarray) -> RowMap:
    """Rows of one right-padded forward over ``mask.shape[0]`` sequences: row ``b * S + s`` is position ``s``."""
    n, width = mask.shape
    return RowMap(seq_id=np.repeat(np.arange(seq_start, seq_start + n, dtype=np.int32), width),
                  pos=np.tile(np.arange(width, dtype=np.int32), n), keep=mask.reshape(-1).astype(bool))


def generation_rows(seq_start: int, prompt_lens: Sequence[int], width: int, n_generated: Sequence[int],
                    n_steps: int) -> RowMap:
    """Rows of one batched generation, in the order its router calls consume them.

    The prompts are left-padded to ``width``: the prompt forward has ``B * width`` rows, row ``b`` holding its
    real tokens in its last ``prompt_lens[b]`` columns. Then each of the ``n_steps`` cached forwards routes one
    token per row: step ``j`` (1-based) routes row ``b``'s ``j``-th generated token, at position
    ``prompt_lens[b] + j - 1``, kept only while ``j <= n_generated[b]`` (a row that stopped keeps generating
    padding in the batch; none of it is stored).
    """
    n = len(prompt_lens)
    lens = np.asarray(prompt_lens, dtype=np.int32)
    seq = np.arange(seq_start, seq_start + n, dtype=np.int32)
    prompt_pos = np.arange(width, dtype=np.int32)[None, :] - (width - lens)[:, None]
    steps = np.arange(1, n_steps + 1, dtype=np.int32)[:, None]
    step_pos = lens[None, :] + steps - 1
    return RowMap(
        seq_id=np.concatenate([np.repeat(seq, width), np.tile(seq, n_steps)]),
        pos=np.concatenate([prompt_pos.reshape(-1), step_pos.reshape(-1)]),
        keep=np.concatenate([(prompt_pos >= 0).reshape(-1), (steps <= np.asarray(n_generated)[None, :]).reshape(-1)]),
    )


def routing_columns(calls: Sequence, rows: RowMap) -> dict[str, dict[str, np.ndarray]]:
    """Columns for the `routing`, `shared_experts` and `router_logits` tables from decoded router calls.

    Slots are re-ordered by descending gate weight (stable, so ties keep the model's slot order): DeepSeek
    routers return unsorted indices, and rank-sensitive metrics (first choice, SCH) need a defined order.
    Padding slots of a variable-size routing (top-p steering) are not stored: such a token has fewer ranks.
    Output arrays are allocated once and filled per call: this runs after every forward, so it is kept to a
    few vectorised passes (most routers already return sorted slots, and then no sort runs at all).
    """
    placed = []
    for call in calls:
        sl = rows.take(call.layer, int(call.experts.shape[0]))
        keep = rows.keep[sl]
        everything = bool(keep.all())
        placed.append((call, sl, None if everything else keep))
    n_rows = sum((int(c.experts.shape[0]) if keep is None else int(keep.sum())) * int(c.experts.shape[1])
                 for c, _, keep in placed)
    routing = {
        "seq_id": np.empty(n_rows, np.int32), "pos": np.empty(n_rows, np.int32), "layer": np.empty(n_rows, np.int16),
        "rank": np.empty(n_rows, np.uint8), "expert": np.empty(n_rows, np.int16), "weight": np.empty(n_rows, np.float32),
    }
    shared: dict[str, list[np.ndarray]] = {k: [] for k in ("seq_id", "pos", "layer", "gate")}
    logits: dict[str, list[np.ndarray]] = {k: [] for k in ("seq_id", "pos", "layer", "logits")}
    present = None  # bool[n_rows] once some call had padding slots
    at = 0
    for call, sl, keep in placed:
        seq, pos = rows.seq_id[sl], rows.pos[sl]
        experts, weights = call.experts.numpy(), call.weights.numpy()
        if keep is not None:
            seq, pos, experts, weights = seq[keep], pos[keep], experts[keep], weights[keep]
        n, k = experts.shape
        pad = padding_slots(experts, weights) if k > 1 else None
        if k > 1 and not (weights[:, :-1] >= weights[:, 1:]).all():
            order = np.argsort(-weights, axis=1, kind="stable")
            experts = np.take_along_axis(experts, order, axis=1)
            weights = np.take_along_axis(weights, order, axis=1)
            pad = np.take_along_axis(pad, order, axis=1)
        out = slice(at, at + n * k)
        routing["seq_id"][out] = np.repeat(seq, k)
        routing["pos"][out] = np.repeat(pos, k)
        routing["layer"][out] = call.layer
        routing["rank"][out].reshape(n, k)[:] = np.arange(k, dtype=np.uint8)
        routing["expert"][out] = experts.reshape(-1)
        routing["weight"][out] = weights.reshape(-1)
        if pad is not None and pad.any():
            if present is None:
                present = np.ones(n_rows, bool)
            present[out] = ~pad.reshape(-1)
            routing["rank"][out] = (np.cumsum(~pad, axis=1) - 1).reshape(-1)
        at += n * k
        for table, values in ((shared, call.shared_gate), (logits, call.logits)):
            if values is not None:
                values = values.numpy() if keep is None else values.numpy()[keep]
                table["seq_id"].append(seq)
                table["pos"].append(pos)
                table["layer"].append(np.full(n, call.layer, dtype=np.int16))
                table["gate" if table is shared else "logits"].append(values.astype(np.float32, copy=False))
    if present is not None:
        routing = {name: column[present] for name, column in routing.items()}
    out_tables = {"routing": routing if n_rows else {}, "shared_experts": _concat(shared)}
    if logits["logits"]:
        out_tables["router_logits"] = {
            "seq_id": np.concatenate(logits["seq_id"]),
            "pos": np.concatenate(logits["pos"]),
            "layer": np.concatenate(logits["layer"]),
            "logits": _list_array(logits["logits"]),
        }
    return out_tables


def _list_array(blocks: list[np.ndarray]) -> pa.Array:
    """Rows of [n, E] logit blocks (E may differ per layer) as one Arrow list column, without a Python loop per row."""
    lengths = np.concatenate([np.full(b.shape[0], b.shape[1], dtype=np.int32) for b in blocks])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([b.reshape(-1) for b in blocks])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()))


def _concat(columns: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    if not next(iter(columns.values())):
        return {}
    return {name: np.concatenate(parts) for name, parts in columns.items()}
