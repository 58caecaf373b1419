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


def routing_columns(calls: Sequence, rows: RowMap) -> dict[str, dict[str, np.ndarray]]:
    """Columns for the `routing`, `shared_experts` and `router_logits` tables from decoded router calls.

    Slots are re-ordered by descending gate weight (stable, so ties keep the model's slot order): DeepSeek
    routers return unsorted indices, and rank-sensitive metrics (first choice, SCH) need a defined order.
    """
    routing: dict[str, list[np.ndarray]] = {k: [] for k in ("seq_id", "pos", "layer", "rank", "expert", "weight")}
    shared: dict[str, list[np.ndarray]] = {k: [] for k in ("seq_id", "pos", "layer", "gate")}
    logits: dict[str, list[np.ndarray]] = {k: [] for k in ("seq_id", "pos", "layer", "logits")}
    for call in calls:
        sl = rows.take(call.layer, int(call.experts.shape[0]))
        keep = rows.keep[sl]
        seq = rows.seq_id[sl][keep]
        pos = rows.pos[sl][keep]
        experts = call.experts.numpy()[keep]
        weights = call.weights.numpy()[keep]
        n, k = experts.shape
        order = np.argsort(-weights, axis=1, kind="stable")
        experts = np.take_along_axis(experts, order, axis=1)
        weights = np.take_along_axis(weights, order, axis=1)
        routing["seq_id"].append(np.repeat(seq, k))
        routing["pos"].append(np.repeat(pos, k))
        routing["layer"].append(np.full(n * k, call.layer, dtype=np.int16))
        routing["rank"].append(np.tile(np.arange(k, dtype=np.uint8), n))
        routing["expert"].append(experts.reshape(-1).astype(np.int16))
        routing["weight"].append(weights.reshape(-1).astype(np.float32))
        if call.shared_gate is not None:
            shared["seq_id"].append(seq)
            shared["pos"].append(pos)
            shared["layer"].append(np.full(n, call.layer, dtype=np.int16))
            shared["gate"].append(call.shared_gate.numpy()[keep].astype(np.float32))
        if call.logits is not None:
            logits["seq_id"].append(seq)
            logits["pos"].append(pos)
            logits["layer"].append(np.full(n, call.layer, dtype=np.int16))
            logits["logits"].append(call.logits.numpy()[keep].astype(np.float32))
    out = {"routing": _concat(routing), "shared_experts": _concat(shared)}
    if logits["logits"]:
        out["router_logits"] = {
            "seq_id": np.concatenate(logits["seq_id"]),
            "pos": np.concatenate(logits["pos"]),
            "layer": np.concatenate(logits["layer"]),
            "logits": _list_array(logits["logits"]),
        }
    return out


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
