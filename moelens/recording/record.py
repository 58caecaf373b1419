"""`record()`: run a model over inputs (plain forwards or `generate`) and store the routing it used.

A run is created in state ``recording`` and marked ``complete`` only after its last rows are written;
any exception, Ctrl-C included, marks it ``failed`` with the reason, so an interrupted run never looks
complete. Hooks are removed on every exit path (`RoutingCapture` is a context manager). Inputs the model
cannot take (a tokenizer with more ids than the embedding has rows) are refused before a run is created.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from moelens.adapters import MoEInfo, RoutingCapture, find_routers, unwrap
from moelens.adapters.capture import PendingCalls
from moelens.adapters.contributions import check_supported, contribution_columns
from moelens.errors import InputError
from moelens.recording.batch import RowMap, forward_rows, generation_rows, routing_columns
from moelens.recording.inputs import documents
from moelens.recording.tokenize import Chunk, chunk_documents, decoded_texts, make_chunk
from moelens.recording.writer import BackgroundWriter, Job, RunWriter, ShardTarget
from moelens.store import DEFAULT_DB, TraceStore


def record(
    model: Any,
    tokenizer: Any,
    inputs: Any,
    *,
    store: TraceStore | str | Path | None = None,
    labels: Iterable[str | None] | str | None = None,
    batch_size: int = 8,
    seq_len: int = 512,
    max_tokens: int | None = None,
    max_sequences: int | None = None,
    logits: bool = False,
    contributions: bool = False,
    generate: int | dict[str, Any] | None = None,
    chat: bool = False,
    add_special_tokens: bool = True,
    name: str | None = None,
    model_name: str | None = None,
    text_field: str = "text",
    label_field: str | None = "label",
    flush_tokens: int = 65_536,
    progress: bool = True,
    parent_run_id: int | None = None,
    intervention: dict | None = None,
    metadata: dict | None = None,
    max_pending: int = 2,
    into: ShardTarget | None = None,
) -> int:
    """Record the routing of ``model`` over ``inputs`` into ``store`` and return the new run id.

    ``inputs``: texts, token-id lists, dicts with ``text_field``/``label_field``, `Document`s or a
    ``datasets.Dataset``. Long documents are cut into sequences of at most ``seq_len`` tokens; padding is
    never stored. ``chat=True`` renders each input with the tokenizer's chat template (a ``messages`` list,
    or the text as one user turn; the template's BOS is the only one); ``add_special_tokens`` says whether
    plain texts get the tokenizer's BOS/EOS. Token texts follow the convention of `moelens.recording.tokenize`
    (special tokens spell ``""`` and are named in ``tokens.special``). Empty documents are skipped and
    counted in the run's ``metadata["empty_documents"]``.
    ``contributions=True`` also stores each routed expert's output norm and each MoE block's residual cosine
    (tables ``expert_contributions``, ``block_residuals``) for the pruning scores.

    ``generate=N`` (or a dict of ``generate`` keyword arguments: a ``GenerationConfig``, stopping criteria and
    logits processors included; the metadata keeps a readable summary) records each input as a prompt
    followed by its continuation (greedy unless asked otherwise): prompt tokens once, then each new token once,
    as the cached generation routed them. In float32 that routing equals one forward over the final sequence;
    in bfloat16/float16 the cached steps' rounding can differ from a full forward's, so a near-tie between two
    experts may be routed differently: what is stored is what generation used. Prompts are generated
    ``batch_size`` at a time (left-padded, each row stopping at its own EOS); the stored tokens and routing are
    those of generating each prompt alone. Settings whose meaning depends on the padded batch (``max_length``
    without ``max_new_tokens``, custom stopping criteria, stop strings, ``max_time``) generate one prompt at a
    time; the run's ``metadata["generate_batch_size"]`` says which was used.

    ``max_pending``: forwards whose routing may still be in flight to the host or waiting for the writer thread
    (which builds the columns and writes them, so the forward never waits on the host); it bounds the memory
    held. ``0`` builds and writes each forward's columns in the caller, without a thread.

    ``into`` (used by `moelens.recording.distributed`): ``inputs`` are the driver's already cut `Chunk`s, written
    into shard ``into.shard`` of the driver's existing run and finished with that shard's marker; the run itself
    (creation, metadata, complete/failed) stays the driver's.
    """
    model = unwrap(model)  # record the torch module an nnsight wrapper runs
    info = find_routers(model)
    n_rows = _check_vocabulary(tokenizer, model)
    if contributions:
        check_supported(info)  # refuse before a run exists
    gen_kwargs = _generate_kwargs(generate)
    gen_batch = generation_batch_size(model, info, gen_kwargs, batch_size)
    store = store if isinstance(store, TraceStore) else TraceStore(store or DEFAULT_DB)
    docs = documents(inputs, labels if labels is None or isinstance(labels, str) else list(labels),
                     text_field=text_field, label_field=label_field)
    counts: Counter = Counter()
    chunks = _in_vocabulary(_limited(chunk_documents(docs, tokenizer, seq_len, chat=chat, add_special_tokens=add_special_tokens,
                                                     add_generation_prompt=gen_kwargs is not None, counts=counts),
                                     max_tokens, max_sequences), n_rows)
    if into is not None:
        chunks = iter(inputs)  # the driver cut (and checked) them
    first = next(chunks, None)
    if first is None:
        empty = counts["empty_documents"]
        raise InputError("nothing to record: the inputs contain no text or tokens"
                         + (f" (skipped {empty} empty document{'s' if empty != 1 else ''})" if empty else ""))

    run_metadata = recording_metadata(metadata, gen_kwargs, gen_batch, seq_len=seq_len, batch_size=batch_size, logits=logits,
                                      chat=chat, add_special_tokens=add_special_tokens, contributions=contributions)
    if into is not None:
        run_id = into.run_id
    else:
        with store.batch():  # one connection for the run's creation (see `TraceStore.batch`)
            run_id = store.create_run(model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__,
                                      name=name, **run_fields(model, info), parent_run_id=parent_run_id,
                                      intervention=intervention, metadata=run_metadata)
            store.append(run_id, {"layers": layer_rows(info)})
    writer = RunWriter(store, run_id, flush_tokens=flush_tokens, **({} if into is None else
                       {"shard": into.shard, "seq_offset": into.first_seq_id}))
    bar = _progress(progress, max_tokens)
    pad = pad_id(tokenizer, model)
    seq_start = 0
    try:
        with (torch.inference_mode(), RoutingCapture(model, info, logits=logits, contributions=contributions) as capture,
              BackgroundWriter(writer, max_pending) as background):
            all_chunks = itertools.chain([first], chunks)
            if gen_kwargs is None:
                for batch in _batched(all_chunks, batch_size):
                    background.submit(_forward(model, info, capture, batch, seq_start, pad))
                    seq_start += len(batch)
                    bar.update(sum(len(c.ids) for c in batch))
            else:
                eos = _eos_ids(model, gen_kwargs)
                for batch in _batched(all_chunks, gen_batch):
                    background.submit(_generation(model, tokenizer, info, capture, batch, seq_start, pad, gen_kwargs, eos))
                    seq_start += len(batch)
                    bar.update(sum(len(c.ids) for c in batch))
        with store.batch():  # the last rows, the totals and the final status through one connection
            writer.flush()
            if into is not None:
                store.finish_shard(run_id, into.shard)
                return run_id
            store.update_run(run_id, metadata={**run_metadata, "empty_documents": counts["empty_documents"]})
            store.finish_run(run_id, "complete")
    except BaseException as exc:
        reason = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        if into is None:  # a worker's failure is reported (and the run failed) by its driver
            store.finish_run(run_id, "failed", error=reason)
        raise
    finally:
        bar.close()
    return run_id


# -- one unit of work ----------------------------------------------------------------------------------
#
# Each unit runs its forward(s) on the calling thread, starts the host copies of what it captured and returns
# a `Job` that the writer thread runs later: wait for the copies, build the columns. Nothing here waits on the
# device, so on an accelerator the next forward is queued while the previous one's routing is still in flight.


class _HostCopy:
    """A device tensor on its way to the host: a non-blocking copy into pinned memory on CUDA (the
    predicted ids, the generated sequences), a plain copy elsewhere (none on the CPU). `wait` gives numpy."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.cpu()

    def wait(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        return self._host.numpy()


#: CPU logits up to this size are kept for the writer thread to reduce (the next forward runs meanwhile);
#: larger ones are reduced at once rather than held in memory.
DEFERRED_LOGITS_BYTES = 64 * 2**20


class _Predicted:
    """The argmax of a forward's logits (the predicted next ids), on the host.

    On an accelerator: reduced on the device, copied without blocking. On the CPU: reduced by whoever calls
    `wait` (the writer thread) when the logits are small, with numpy's vectorised argmax where the dtype allows
    (same first-maximum rule as torch, several times faster than torch's CPU argmax over a 4k+ vocabulary).
    """

    def __init__(self, logits: torch.Tensor) -> None:
        small = logits.numel() * logits.element_size() <= DEFERRED_LOGITS_BYTES
        self._logits = logits if logits.device.type == "cpu" and small else None
        if self._logits is None:
            self._ids = _cpu_argmax(logits) if logits.device.type == "cpu" else _HostCopy(logits.argmax(-1))

    def wait(self) -> np.ndarray:
        if self._logits is not None:
            self._ids, self._logits = _cpu_argmax(self._logits), None
        return self._ids if isinstance(self._ids, np.ndarray) else self._ids.wait()


def _cpu_argmax(logits: torch.Tensor) -> np.ndarray:
    if logits.dtype in (torch.float16, torch.float32, torch.float64):
        return logits.numpy().argmax(-1)
    return logits.argmax(-1).numpy()


def _routing_tables(info: MoEInfo, pending: PendingCalls, rows: RowMap) -> dict:
    tables = routing_columns(pending.wait(), rows)
    contributions = pending.wait_contributions()
    if contributions is not None:
        tables |= contribution_columns(contributions, rows.seq_id, rows.pos, rows.keep)
    rows.check_complete([s.layer for s in info.sites])
    return tables


def _forward(model: Any, info: MoEInfo, capture: RoutingCapture, batch: list[Chunk], seq_start: int,
             pad: int) -> Job:
    """One padded forward over a batch of sequences (right padding keeps real positions unchanged)."""
    ids, mask = right_padded(batch, pad)
    device = _device(model)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    if info.is_encoder_decoder:  # both stacks route the same tokens at the same positions
        kwargs.update(decoder_input_ids=kwargs["input_ids"], decoder_attention_mask=kwargs["attention_mask"])
    predicted = _Predicted(model(**kwargs).logits)
    pending = capture.pop_async()

    def build() -> tuple[dict, int, int]:
        rows = forward_rows(seq_start, mask.numpy())
        tables = _routing_tables(info, pending, rows)
        kept = predicted.wait().reshape(-1)[rows.keep]
        tables["tokens"] = _token_columns(batch, seq_start, predicted=pa.array(kept, type=pa.int32()))
        tables["sequences"] = _sequence_columns(batch, seq_start, prompt_lens=[len(c.ids) for c in batch])
        return tables, int(rows.keep.sum()), len(batch)

    return build


def _generation(model: Any, tokenizer: Any, info: MoEInfo, capture: RoutingCapture, batch: list[Chunk],
                seq_start: int, pad: int, gen_kwargs: dict[str, Any], eos: set[int]) -> Job:
    """One batched generation from ``len(batch)`` left-padded prompts, recording every token once, as
    generation routed it.

    ``generate`` routes the prompts, then one new token per row and step (positions follow the attention
    mask); the last new token is never fed back, so one extra cached forward routes it. A row ends at its
    first ``eos`` (kept) or after all new tokens, as it would alone; what a finished row generates while the
    others go on is never stored. In float32 the result equals recording each prompt alone (and a plain forward
    over the final sequence); in half precision a near-tie may go the other way. Generated token texts are
    their spans in ``tokenizer.decode(prompt + generated)``.
    """
    device = _device(model)
    ids, mask = left_padded(batch, pad)
    ids, mask = ids.to(device), mask.to(device)
    ours = {"return_dict_in_generate": True, "output_logits": True, "pad_token_id": pad}
    kwargs = dict(gen_kwargs)
    if "generation_config" in kwargs:  # transformers wants either a config or loose settings, not both
        kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
        kwargs["generation_config"].update(**ours)
    else:
        kwargs.update(ours)
    out = model.generate(ids, attention_mask=mask, **kwargs)
    width, n_new = ids.shape[1], out.sequences.shape[1] - ids.shape[1]
    full_mask = torch.cat([mask, mask.new_ones(len(batch), n_new)], dim=1)
    # A left-padded row's last token sits at its own position, not at the cache length (one prompt: no padding).
    positions = {"position_ids": full_mask.sum(-1, keepdim=True) - 1} if len(batch) > 1 else {}
    last = model(out.sequences[:, -1:], attention_mask=full_mask, use_cache=True, **positions,
                 **_cache_argument(model, out))
    # Raw logits of every step (and of the extra forward): their argmax predicts the next token of each row.
    predicted = _HostCopy(torch.stack([s.argmax(-1) for s in [*out.logits, last.logits[:, -1]]], dim=1))
    sequences = _HostCopy(out.sequences)
    pending = capture.pop_async()

    def build() -> tuple[dict, int, int]:
        generated = sequences.wait()[:, width:]
        step_predicted = predicted.wait()
        n_generated = [_generated_length(row, eos) for row in generated]
        rows = generation_rows(seq_start, [len(c.ids) for c in batch], width, n_generated, n_new)
        tables = _routing_tables(info, pending, rows)
        fulls, predicted_ids, phase = [], [], []
        for chunk, new, n, step in zip(batch, generated, n_generated, step_predicted):
            n_prompt, new_ids = len(chunk.ids), [int(t) for t in new[:n]]
            if tokenizer is None:
                new_tokens, new_special = [None] * n, [None] * n
            else:
                new_tokens, new_special = decoded_texts(tokenizer, [*chunk.ids, *new_ids], start=n_prompt)
            fulls.append(make_chunk([*chunk.ids, *new_ids], [*chunk.tokens, *new_tokens],
                                    [*(chunk.special or [None] * n_prompt), *new_special],
                                    label=chunk.label, source=chunk.source))
            row_predicted = np.full(n_prompt + n, -1, dtype=np.int64)
            row_predicted[n_prompt - 1:] = step[: n + 1]
            predicted_ids.append(row_predicted)
            phase += ["prompt"] * n_prompt + ["generated"] * n
        all_predicted = np.concatenate(predicted_ids)
        tables["tokens"] = _token_columns(fulls, seq_start, phase=phase,
                                          predicted=pa.array(all_predicted, mask=all_predicted < 0, type=pa.int32()))
        tables["sequences"] = _sequence_columns(fulls, seq_start, prompt_lens=[len(c.ids) for c in batch])
        return tables, len(all_predicted), len(batch)

    return build


def _generated_length(new_ids: np.ndarray, eos: set[int]) -> int:
    """How many of a row's new tokens are its own: up to and including its first end-of-sequence token."""
    for i, token in enumerate(new_ids.tolist()):
        if token in eos:
            return i + 1
    return len(new_ids)


def _cache_argument(model: Any, out: Any) -> dict[str, Any]:
    """The generation's KV cache as the forward wants it (see `cache_keyword`)."""
    return {cache_keyword(model): output_cache(out)}


def cache_keyword(model: Any) -> str:
    """The forward's KV-cache keyword: ``cache`` since transformers 5.24 (the old ``past_key_values`` name is
    removed in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward or ``generate`` returned, under either name."""
    return out["cache"] if "cache" in out.keys() else out["past_key_values"]


# -- columns -------------------------------------------------------------------------------------------


def _token_columns(batch: list[Chunk], seq_start: int, *, predicted: pa.Array, phase: list[str] | None = None) -> dict:
    lengths = [len(c.ids) for c in batch]
    return {
        "seq_id": np.repeat(np.arange(seq_start, seq_start + len(batch), dtype=np.int32), lengths),
        "pos": np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
        "token_id": np.concatenate([np.asarray(c.ids, dtype=np.int32) for c in batch]),
        "token": [t for c in batch for t in c.tokens],
        "special": [s for c in batch for s in (c.special or [None] * len(c.ids))],
        "phase": phase or ["prompt"] * sum(lengths),
        "predicted_id": predicted,
    }


def _sequence_columns(batch: list[Chunk], seq_start: int, *, prompt_lens: list[int]) -> dict:
    return {
        "seq_id": np.arange(seq_start, seq_start + len(batch), dtype=np.int32),
        "label": [c.label for c in batch],
        "source": [c.source for c in batch],
        "prompt_len": np.asarray(prompt_lens, dtype=np.int32),
        "n_tokens": np.asarray([len(c.ids) for c in batch], dtype=np.int32),
        "text": [c.text for c in batch],
    }


def layer_rows(info: MoEInfo) -> dict:
    """The `layers` table rows of a run: one per router site (the key analyses use for each layer)."""
    return {
        "layer": [s.layer for s in info.sites],
        "block": [s.block for s in info.sites],
        "module": [s.name for s in info.sites],
        "kind": [s.kind for s in info.sites],
        "n_experts": [s.n_experts for s in info.sites],
        "top_k": [s.top_k for s in info.sites],
        "has_shared_expert": [s.has_shared_expert for s in info.sites],
    }


def routing_fields(info: MoEInfo) -> dict[str, Any]:
    """The run fields that describe the model's MoE layout (no weights needed)."""
    return {
        "model_type": info.model_type,
        "n_layers": info.n_layers,
        "moe_layers": [s.layer for s in info.sites],
        "n_experts": info.n_experts,
        "top_k": info.top_k,
        "n_shared_experts": info.n_shared_experts,
        "routing_function": info.routing_function,
    }


def run_fields(model: Any, info: MoEInfo) -> dict[str, Any]:
    """Every model-describing run field: the MoE layout plus revision (or router-weight hash), dtype and device."""
    param = next(model.parameters())
    return {
        **routing_fields(info),
        "revision": getattr(model.config, "_commit_hash", None) or f"router-sha1:{router_fingerprint(info)}",
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
    }


def router_fingerprint(info: MoEInfo) -> str:
    """A short hash of the router weights: tells two checkpoints apart without hashing the whole model."""
    digest = hashlib.sha1()
    for site in info.sites:
        digest.update(site.logit_weight.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


# -- helpers -------------------------------------------------------------------------------------------


def _limited(chunks: Iterator[Chunk], max_tokens: int | None, max_sequences: int | None) -> Iterator[Chunk]:
    """Stop after ``max_sequences`` sequences or ``max_tokens`` tokens (the last sequence is cut to fit)."""
    n_tokens = 0
    for i, chunk in enumerate(chunks):
        if max_sequences is not None and i >= max_sequences:
            return
        if max_tokens is not None:
            room = max_tokens - n_tokens
            if room <= 0:
                return
            if len(chunk.ids) > room:
                chunk = make_chunk(chunk.ids[:room], chunk.tokens[:room], (chunk.special or [None] * len(chunk.ids))[:room],
                                   label=chunk.label, source=chunk.source)
        n_tokens += len(chunk.ids)
        yield chunk


def _batched(chunks: Iterable[Chunk], size: int) -> Iterator[list[Chunk]]:
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    it = iter(chunks)
    while batch := list(itertools.islice(it, size)):
        yield batch


def recording_metadata(metadata: dict | None, gen_kwargs: dict[str, Any] | None, gen_batch: int | None,
                       **settings: Any) -> dict:
    """A run's metadata: the caller's, the recording settings, a readable ``generate`` and, when generating,
    the batch size generation actually used (shared by `record` and the distributed driver)."""
    out = {**(metadata or {}), **settings, "generate": None if gen_kwargs is None else readable(gen_kwargs)}
    if gen_batch is not None:
        out["generate_batch_size"] = gen_batch
    return out


def generation_batch_size(model: Any, info: MoEInfo, gen_kwargs: dict[str, Any] | None, batch_size: int) -> int | None:
    """How many prompts to generate at once (None: not generating); refuses encoder-decoder models.

    ``batch_size``, or 1 where a padded batch would stop rows differently than generating each alone: a
    ``max_length`` counts the left padding, stopping criteria and stop strings see the padded ids, and a model
    whose forward takes no ``position_ids`` cannot place a left-padded row's tokens at their own positions."""
    if gen_kwargs is None:
        return None
    if info.is_encoder_decoder:
        raise InputError("generation recording supports decoder-only models; record encoder-decoder models with forwards")
    stops = ("stopping_criteria", "stop_strings", "max_time")
    if (_generation_setting(gen_kwargs, "max_new_tokens") is None or any(_generation_setting(gen_kwargs, n) for n in stops)
            or "position_ids" not in inspect.signature(model.forward).parameters):
        return 1
    return batch_size


def _generation_setting(gen_kwargs: dict[str, Any], name: str) -> Any:
    """A ``generate`` setting as given: the keyword, else the passed ``GenerationConfig``'s field."""
    value = gen_kwargs.get(name)
    config = gen_kwargs.get("generation_config")
    return getattr(config, name, None) if value is None and config is not None else value


def _eos_ids(model: Any, gen_kwargs: dict[str, Any]) -> set[int]:
    """The end-of-sequence ids generation stops a row at: the call's, else the model's generation config's."""
    value = _generation_setting(gen_kwargs, "eos_token_id")
    if value is None:
        value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        return set()
    value = value.tolist() if isinstance(value, torch.Tensor) else value
    return {int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value])}


def _generate_kwargs(generate: int | dict[str, Any] | None) -> dict[str, Any] | None:
    if generate is None or generate is False:
        return None
    kwargs = {"max_new_tokens": generate} if isinstance(generate, int) else dict(generate)
    if "generation_config" not in kwargs:  # a GenerationConfig says itself whether to sample
        kwargs.setdefault("do_sample", False)
    config = kwargs.get("generation_config")
    if kwargs.get("use_cache") is False or getattr(config, "use_cache", True) is False:
        raise InputError("generate with use_cache=False re-routes the whole prefix at every step; moelens records "
                         "cached generation (drop use_cache=False)")
    for name in ("num_beams", "num_return_sequences"):
        if (_generation_setting(kwargs, name) or 1) > 1:
            raise InputError(f"generate with {name} > 1 routes several candidates per prompt and keeps one; moelens "
                             f"records one continuation per prompt (drop {name})")
    return kwargs


def readable(value: Any) -> Any:
    """A JSON-safe summary of ``generate`` arguments: numbers and strings as they are, a ``GenerationConfig``
    as its non-default fields, tensors by shape, other objects (stopping criteria, logits processors) by class
    and simple attributes, e.g. ``MaxLengthCriteria(max_length=20)``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): readable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [readable(v) for v in value]
    if hasattr(value, "to_diff_dict"):  # GenerationConfig
        return {"GenerationConfig": readable(value.to_diff_dict())}
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={list(value.shape)}, dtype={str(value.dtype).removeprefix('torch.')})"
    simple = {k: v for k, v in getattr(value, "__dict__", {}).items()
              if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))}
    return f"{type(value).__name__}({', '.join(f'{k}={v!r}' for k, v in simple.items())})"


def _check_vocabulary(tokenizer: Any, model: Any) -> int | None:
    """Refuse a tokenizer with more ids than the model's embedding has rows (its forward would raise an
    IndexError mid-run); return the number of rows, to check pre-tokenized ids as well."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:
        return None
    if tokenizer is not None:
        try:
            n_ids = len(tokenizer)
        except TypeError:
            n_ids = getattr(tokenizer, "vocab_size", None)
        if n_ids is not None and n_ids > rows:
            raise InputError(f"the tokenizer has {n_ids} token ids but the model's embedding has {rows} rows; "
                             "load the tokenizer that belongs to this model")
    return int(rows)


def _in_vocabulary(chunks: Iterator[Chunk], n_rows: int | None) -> Iterator[Chunk]:
    """Pre-tokenized ids must fit the embedding too (one clear line instead of an IndexError traceback)."""
    for chunk in chunks:
        if n_rows is not None and chunk.ids and (max(chunk.ids) >= n_rows or min(chunk.ids) < 0):
            bad = max(chunk.ids) if max(chunk.ids) >= n_rows else min(chunk.ids)
            raise InputError(f"{chunk.source}: token id {bad} is outside the model's embedding (ids 0..{n_rows - 1})")
        yield chunk


def right_padded(batch: list[Chunk], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, S], attention_mask [B, S])`` on the CPU; right padding keeps every real token's position."""
    ids = torch.full((len(batch), max(len(c.ids) for c in batch)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, chunk in enumerate(batch):
        ids[i, : len(chunk.ids)] = torch.tensor(chunk.ids)
        mask[i, : len(chunk.ids)] = 1
    return ids, mask


def left_padded(batch: list[Chunk], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, S], attention_mask [B, S])`` on the CPU, padded on the left: every row's next token is in the
    last column, as batched generation needs."""
    ids, mask = right_padded(batch, pad)
    for i, chunk in enumerate(batch):
        shift = ids.shape[1] - len(chunk.ids)
        ids[i], mask[i] = ids[i].roll(shift), mask[i].roll(shift)
    return ids, mask


def pad_id(tokenizer: Any, model: Any) -> int:
    """The id used to pad batches (never stored): the tokenizer's, else the model config's, else 0."""
    for source in (tokenizer, model.config):
        value = getattr(source, "pad_token_id", None)
        if value is not None:
            return int(value)
    return 0


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _progress(enabled: bool, total: int | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, desc="recording", disable=not enabled, dynamic_ncols=True)
