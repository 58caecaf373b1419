"""Store the expert ids that a serving engine returned as an ordinary moelens run.

vLLM, SGLang and TensorRT-LLM can return the experts every token was routed to (ids only, no gate weights),
each in its own shape. This module reads a JSONL file of such request outputs, puts every id at the
``(seq_id, pos, layer, rank)`` it belongs to — the layer axis mapped to the model's own MoE layer ids — and
writes one run whose ``routing.weight`` is NULL. What each engine returns (``docs``: README "Serving-engine
traces"):

* **vLLM** (``enable_return_routed_experts=True``): ``prompt_routed_experts`` ``[prompt_len, layers, k]`` on
  the request and ``routed_experts`` ``[gen_len, layers, k]`` on each completion; the last generated token is
  never fed back, so its row is absent or a zero row. Older builds have an all-layers axis whose dense layers
  are zero rows.
* **SGLang** (``return_routed_experts``): ``meta_info["routed_experts"]``, base64 of int32, reshaped to
  ``(seq_len - 1, layers, k)``: every token but the last.
* **TensorRT-LLM**: ``CompletionOutput.routed_experts`` ``(seq_len - 1, moe_layers, k)``.

A row that is None or all -1, or all zeros where k ≥ 2 (k distinct experts cannot all be 0), is *missing* (a
dense layer, the unrouted last token): it is not stored, so the routing table has no rows there — never a
fake expert 0. Single -1 slots (a variable number of experts) are left out the same way.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moelens.errors import InputError

FORMATS = ("vllm", "sglang", "trtllm")


@dataclass(frozen=True)
class EngineLayout:
    """What the import needs to know about the model: its MoE layer ids (ascending), the block each one
    sits in, the total number of blocks, and the experts and k of every MoE layer."""

    layers: tuple[int, ...]
    blocks: tuple[int, ...]
    n_blocks: int
    n_experts: tuple[int, ...]
    top_k: tuple[int, ...]


@dataclass
class EngineRequest:
    """One sequence as the engine saw it: all token ids, how many were prompt, and the routed ids of the
    consecutive positions starting at 0 (``experts[i]`` belongs to position ``i``), ``[rows, axis, k]``."""

    ids: list[int]
    prompt_len: int
    experts: np.ndarray
    label: str | None
    source: str


def read_engine_file(path: str | Path, fmt: str, *, top_k: int) -> Iterator[EngineRequest]:
    """Every sequence in a JSONL file of ``fmt`` request outputs, in file order (one line per request; a
    request with several completions gives one sequence per completion)."""
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"engine output file {path} does not exist")
    parse = {"vllm": _vllm, "sglang": _sglang, "trtllm": _trtllm}[fmt]
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
            try:
                yield from parse(record, top_k, f"{path.name}:{number}")
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{path}:{number}: not a {fmt} request output ({type(exc).__name__}: {exc})") from exc


def _vllm(record: dict, top_k: int, source: str) -> Iterator[EngineRequest]:
    prompt = [int(t) for t in record["prompt_token_ids"]]
    prompt_rows = _routes(record.get("prompt_routed_experts"), top_k, len(prompt))
    completions = record.get("outputs", record.get("choices")) or [{"token_ids": [], "routed_experts": None}]
    for i, completion in enumerate(completions):
        generated = [int(t) for t in completion.get("token_ids") or []]
        gen_rows = _routes(completion.get("routed_experts"), top_k, len(generated))
        rows = _concat(prompt_rows, gen_rows, len(prompt))
        yield EngineRequest(prompt + generated, len(prompt), rows, record.get("label"),
                            source if len(completions) == 1 else f"{source}#{i}")


def _sglang(record: dict, top_k: int, source: str) -> Iterator[EngineRequest]:
    prompt = [int(t) for t in record.get("input_ids", record.get("prompt_token_ids"))]
    generated = [int(t) for t in record.get("output_ids") or []]
    n = len(prompt) + len(generated)
    raw = record["meta_info"]["routed_experts"]
    flat = np.frombuffer(base64.b64decode(raw), dtype="<i4") if isinstance(raw, str) else np.asarray(raw).ravel()
    yield EngineRequest(prompt + generated, len(prompt), _reshape(flat, n - 1, top_k), record.get("label"), source)


def _trtllm(record: dict, top_k: int, source: str) -> Iterator[EngineRequest]:
    prompt = [int(t) for t in record["prompt_token_ids"]]
    for i, completion in enumerate(record["outputs"]):
        generated = [int(t) for t in completion.get("token_ids") or []]
        rows = _routes(completion.get("routed_experts"), top_k, len(prompt) + len(generated))
        yield EngineRequest(prompt + generated, len(prompt), rows, record.get("label"),
                            source if len(record["outputs"]) == 1 else f"{source}#{i}")


def _routes(value: Any, top_k: int, max_rows: int) -> np.ndarray | None:
    """A ``[rows, axis, k]`` int array from nested lists or ``{"data": base64, "shape", "dtype"}``."""
    if value is None:
        return None
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["data"]), dtype=np.dtype(value.get("dtype", "int16")).newbyteorder("<"))
        array = flat.reshape(value["shape"])
    else:
        array = np.array([[[-1 if e is None else e for e in slot] if slot is not None else [-1] * top_k
                           for slot in row] for row in value], dtype=np.int64) if value else np.zeros((0, 0, top_k))
    if array.ndim != 3 or (array.size and array.shape[2] != top_k):
        raise ValueError(f"routed experts of shape {list(array.shape)}; expected [tokens, layers, {top_k}]")
    if array.shape[0] > max_rows:
        raise ValueError(f"{array.shape[0]} routed rows for {max_rows} tokens")
    return array.astype(np.int64)


def _reshape(flat: np.ndarray, rows: int, top_k: int) -> np.ndarray:
    if rows <= 0 or flat.size % (rows * top_k):
        raise ValueError(f"{flat.size} routed ids do not split into ({rows} tokens, layers, {top_k})")
    return flat.astype(np.int64).reshape(rows, flat.size // (rows * top_k), top_k)


def _concat(prompt_rows: np.ndarray | None, gen_rows: np.ndarray | None, prompt_len: int) -> np.ndarray:
    """Prompt rows at positions 0..P-1 and generated rows from position P on (a missing part is -1)."""
    parts = [p for p in (prompt_rows, gen_rows) if p is not None and p.size]
    if not parts:
        return np.zeros((0, 0, 0), dtype=np.int64)
    axis, k = parts[0].shape[1:]
    prompt = prompt_rows if prompt_rows is not None and prompt_rows.size else np.full((prompt_len, axis, k), -1)
    if prompt.shape[0] < prompt_len:
        prompt = np.concatenate([prompt, np.full((prompt_len - prompt.shape[0], axis, k), -1)])
    if gen_rows is None or not gen_rows.size:
        return prompt
    if gen_rows.shape[1:] != prompt.shape[1:]:
        raise ValueError(f"prompt and completion routing differ in shape: {list(prompt.shape)} vs {list(gen_rows.shape)}")
    return np.concatenate([prompt, gen_rows])


def layer_map(axis: int, layout: EngineLayout) -> np.ndarray:
    """For each index of an engine's layer axis, the moelens layer id it holds (-1: a dense block).

    An axis as long as the MoE layers lists them in order; one as long as all blocks is indexed by block."""
    if axis == len(layout.layers):
        return np.asarray(layout.layers, dtype=np.int64)
    if axis == layout.n_blocks and len(set(layout.blocks)) == len(layout.blocks):
        out = np.full(axis, -1, dtype=np.int64)
        out[list(layout.blocks)] = layout.layers
        return out
    raise InputError(
        f"the engine's layer axis has {axis} entries but the model has {len(layout.layers)} MoE layers in "
        f"{layout.n_blocks} blocks: was the file recorded from another model?"
    )


def routing_rows(request: EngineRequest, seq_id: int, layout: EngineLayout) -> dict[str, np.ndarray]:
    """The ``routing`` columns of one sequence; missing rows (None/-1/all-zero) are left out."""
    experts = request.experts
    if experts.size == 0:
        return {name: np.zeros(0, dtype=np.int32) for name in ("seq_id", "pos", "layer", "rank", "expert")}
    rows, axis, k = experts.shape
    layers = layer_map(axis, layout)
    index = {layer: i for i, layer in enumerate(layout.layers)}
    k_model = max(layout.top_k)
    if k > k_model:
        raise InputError(f"the engine returned {k} experts per token; the model routes to {k_model}")
    valid = experts >= 0
    present = valid.any(axis=2) & (layers >= 0)[None, :]
    if k >= 2:  # k distinct experts are never all 0: an all-zero row is a placeholder
        present &= (experts != 0).any(axis=2)
    pos, slot, rank = np.nonzero(present[:, :, None] & valid)
    chosen = experts[pos, slot, rank]
    layer = layers[slot]
    limit = np.asarray(layout.n_experts, dtype=np.int64)[[index[int(x)] for x in layer]] if len(layer) else chosen
    bad = np.flatnonzero(chosen >= limit)
    if len(bad):
        i = bad[0]
        raise InputError(f"expert id {int(chosen[i])} at position {int(pos[i])}, layer {int(layer[i])} is out of range "
                         f"for the model ({int(limit[i])} experts): was the file recorded from another model?")
    return {
        "seq_id": np.full(len(pos), seq_id, dtype=np.int32),
        "pos": pos.astype(np.int32),
        "layer": layer.astype(np.int32),
        "rank": rank.astype(np.int16),
        "expert": chosen.astype(np.int16),
    }


def engine_layout(info: Any) -> EngineLayout:
    """The `EngineLayout` of a model's `MoEInfo` (from `moelens.adapters.find_routers`)."""
    sites = sorted(info.sites, key=lambda s: s.layer)
    return EngineLayout(layers=tuple(s.layer for s in sites), blocks=tuple(s.block for s in sites),
                        n_blocks=int(info.n_layers), n_experts=tuple(s.n_experts for s in sites),
                        top_k=tuple(s.top_k for s in sites))


def import_engine_file(
    path: str | Path,
    fmt: str,
    *,
    store: Any,
    info: Any,
    tokenizer: Any = None,
    model_name: str,
    engine_version: str | None = None,
    name: str | None = None,
    label: str | None = None,
    progress: bool = True,
) -> int:
    """Store a JSONL file of ``fmt`` request outputs as one run and return its id.

    ``info`` is the model's `MoEInfo` (no weights are needed: a model built on the meta device will do);
    ``tokenizer`` gives every token its exact text (decoded with context). Sequences get ids 0, 1, ... in
    file order, so a teacher-forced re-run of the same ids lines up position for position. The run is
    marked complete only after every request is stored; a bad line fails it with the reason.
    """
    from tqdm.auto import tqdm

    from moelens.recording.inputs import Document
    from moelens.recording.record import layer_rows, routing_fields
    from moelens.recording.tokenize import chunk_documents
    from moelens.recording.writer import RunWriter

    layout = engine_layout(info)
    requests = read_engine_file(path, fmt, top_k=max(layout.top_k))
    first = next(requests, None)
    if first is None:
        raise InputError(f"{path} holds no request outputs")
    run_id = store.create_run(
        model_name, name=name, **routing_fields(info), device=fmt,
        metadata={"engine": fmt, "engine_version": engine_version, "source_file": str(path),
                  "weights": "not returned by the engine (NULL)"},
    )
    store.append(run_id, {"layers": layer_rows(info)})
    writer = RunWriter(store, run_id)
    bar = tqdm(unit="seq", desc=f"importing {fmt}", disable=not progress, dynamic_ncols=True)
    try:
        seq_id = 0
        for request in _chain(first, requests):
            chunk = next(chunk_documents([Document(ids=tuple(request.ids))], tokenizer, max(len(request.ids), 1)))
            routing = routing_rows(request, seq_id, layout)
            routing["weight"] = pa.nulls(len(routing["expert"]), pa.float32())  # engines return no weights
            n = len(request.ids)
            tables = {
                "routing": routing,
                "tokens": {"seq_id": np.full(n, seq_id, dtype=np.int32), "pos": np.arange(n, dtype=np.int32),
                           "token_id": np.asarray(request.ids, dtype=np.int32), "token": chunk.tokens,
                           "phase": ["prompt"] * request.prompt_len + ["generated"] * (n - request.prompt_len)},
                "sequences": {"seq_id": np.asarray([seq_id], dtype=np.int32), "label": [request.label or label],
                              "source": [request.source], "prompt_len": np.asarray([request.prompt_len], dtype=np.int32),
                              "n_tokens": np.asarray([n], dtype=np.int32), "text": [chunk.text]},
            }
            writer.add(tables, n_tokens=n, n_sequences=1)
            seq_id += 1
            bar.update()
        writer.flush()
    except BaseException as exc:
        store.finish_run(run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        bar.close()
    store.finish_run(run_id, "complete")
    return run_id


def teacher_force(model: Any, tokenizer: Any, store: Any, run_id: int, *, batch_size: int = 8, progress: bool = True) -> int:
    """Re-run an imported run's exact token ids through ``model`` with moelens' hooks and store that as a
    second run (child of ``run_id``, same seq ids and positions), which fills in the gate weights the engine
    did not return; `moelens.analysis.run_agreement` then says how often engine and transformers disagree."""
    from moelens.recording.record import record

    tokens = store.query("SELECT seq_id, list(token_id ORDER BY pos) AS ids FROM tokens WHERE run_id = ? "
                         "GROUP BY seq_id ORDER BY seq_id", [run_id])
    sequences = store.query("SELECT label, source FROM sequences WHERE run_id = ? ORDER BY seq_id", [run_id])
    ids = [list(map(int, seq)) for seq in tokens["ids"]]
    labels = [None if label is None or label != label else label for label in sequences["label"]]
    info = store.run(run_id)
    return record(model, tokenizer, ids, labels=labels, store=store, seq_len=max(map(len, ids)), batch_size=batch_size,
                  parent_run_id=run_id, name=f"teacher-forced {info.get('name') or run_id}", model_name=info["model"],
                  metadata={"teacher_forced_from": run_id}, progress=progress)


def _chain(first: EngineRequest, rest: Iterator[EngineRequest]) -> Iterator[EngineRequest]:
    yield first
    yield from rest


def layout_model(spec: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The model ``spec`` names, built on the meta device from its config alone: enough for
    `find_routers` to read the MoE layout, without loading (or having) any weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.startswith("tiny:"):
        from moelens.tiny import tiny_config

        try:
            config = tiny_config(spec[5:])
        except ValueError as exc:
            raise InputError(f"{spec!r}: transformers has no model type {spec[5:]!r}") from exc
    else:
        from moelens.demo import model_path

        spec = model_path(spec)
        try:
            config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code, revision=revision)
        except (OSError, ValueError) as exc:
            raise InputError(f"could not read the model config of {spec!r}: {exc}") from exc
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
