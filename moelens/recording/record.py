"""`record()`: run a model over inputs (plain forwards or `generate`) and store the routing it used.

A run is created in state ``recording`` and marked ``complete`` only after its last rows are written;
any exception, Ctrl-C included, marks it ``failed`` with the reason, so an interrupted run never looks
complete. Hooks are removed on every exit path (`RoutingCapture` is a context manager).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from moelens.adapters import MoEInfo, RoutingCapture, find_routers
from moelens.adapters.contributions import check_supported
from moelens.errors import InputError
from moelens.recording.batch import RowMap, routing_columns
from moelens.recording.inputs import documents
from moelens.recording.tokenize import Chunk, chunk_documents
from moelens.recording.writer import RunWriter
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
    name: str | None = None,
    model_name: str | None = None,
    text_field: str = "text",
    label_field: str | None = "label",
    flush_tokens: int = 65_536,
    progress: bool = True,
    parent_run_id: int | None = None,
    intervention: dict | None = None,
    metadata: dict | None = None,
) -> int:
    """Record the routing of ``model`` over ``inputs`` into ``store`` and return the new run id.

    ``inputs``: texts, token-id lists, dicts with ``text_field``/``label_field``, `Document`s or a
    ``datasets.Dataset``. Long documents are cut into sequences of at most ``seq_len`` tokens; padding is
    never stored. ``generate=N`` (or a dict of ``generate`` keyword arguments) records each input as a
    prompt followed by its greedy continuation: prompt tokens once, then each new token once.
    ``contributions=True`` also stores each routed expert's output norm and each MoE block's residual cosine
    (tables ``expert_contributions``, ``block_residuals``) for the pruning scores.
    """
    if type(model).__module__.startswith("nnsight"):  # record the torch module an nnsight wrapper runs
        from moelens.steering.nnsight_backend import unwrap

        model = unwrap(model)
    store = store if isinstance(store, TraceStore) else TraceStore(store or DEFAULT_DB)
    info = find_routers(model)
    if contributions:
        check_supported(info)  # refuse before a run exists
    docs = documents(inputs, labels if labels is None or isinstance(labels, str) else list(labels),
                     text_field=text_field, label_field=label_field)
    chunks = _limited(chunk_documents(docs, tokenizer, seq_len), max_tokens, max_sequences)
    first = next(chunks, None)
    if first is None:
        raise InputError("nothing to record: the inputs contain no text or tokens")
    gen_kwargs = _generate_kwargs(generate)
    if gen_kwargs is not None and info.is_encoder_decoder:
        raise InputError("generation recording supports decoder-only models; record encoder-decoder models with forwards")

    run_id = store.create_run(
        model_name or getattr(model.config, "_name_or_path", None) or type(model).__name__,
        name=name,
        **_run_fields(model, info),
        parent_run_id=parent_run_id,
        intervention=intervention,
        metadata={**(metadata or {}), "seq_len": seq_len, "batch_size": batch_size, "logits": logits,
                  "contributions": contributions, "generate": gen_kwargs},
    )
    store.append(run_id, {"layers": _layer_rows(info)})
    writer = RunWriter(store, run_id, flush_tokens=flush_tokens)
    bar = _progress(progress, max_tokens)
    try:
        with torch.inference_mode(), RoutingCapture(model, info, logits=logits, contributions=contributions) as capture:
            all_chunks = itertools.chain([first], chunks)
            if gen_kwargs is None:
                for batch in _batched(all_chunks, batch_size):
                    _forward(model, tokenizer, info, capture, batch, writer)
                    bar.update(sum(len(c.ids) for c in batch))
            else:
                for chunk in all_chunks:
                    _generation(model, tokenizer, info, capture, chunk, writer, gen_kwargs)
                    bar.update(len(chunk.ids))
        writer.flush()
    except BaseException as exc:
        reason = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        store.finish_run(run_id, "failed", error=reason)
        raise
    finally:
        bar.close()
    store.finish_run(run_id, "complete")
    return run_id


# -- one unit of work ----------------------------------------------------------------------------------


def _forward(model: Any, tokenizer: Any, info: MoEInfo, capture: RoutingCapture, batch: list[Chunk],
             writer: RunWriter) -> None:
    """One padded forward over a batch of sequences (right padding keeps real positions unchanged)."""
    seq_start = writer.n_sequences
    ids, mask = right_padded(batch, pad_id(tokenizer, model))
    width = ids.shape[1]
    device = _device(model)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    if info.is_encoder_decoder:  # both stacks route the same tokens at the same positions
        kwargs.update(decoder_input_ids=kwargs["input_ids"], decoder_attention_mask=kwargs["attention_mask"])
    out = model(**kwargs)
    keep = mask.reshape(-1).numpy().astype(bool)
    rows = RowMap(
        seq_id=np.repeat(np.arange(seq_start, seq_start + len(batch), dtype=np.int32), width),
        pos=np.tile(np.arange(width, dtype=np.int32), len(batch)),
        keep=keep,
    )
    tables = routing_columns(capture.pop(), rows) | capture.contribution_columns(rows)
    rows.check_complete([s.layer for s in info.sites])
    predicted = out.logits.argmax(-1).reshape(-1).cpu().numpy()[keep]
    tables["tokens"] = _token_columns(batch, seq_start, predicted=pa.array(predicted, type=pa.int32()))
    tables["sequences"] = _sequence_columns(batch, seq_start, prompt_lens=[len(c.ids) for c in batch])
    writer.add(tables, n_tokens=int(keep.sum()), n_sequences=len(batch))


def _generation(model: Any, tokenizer: Any, info: MoEInfo, capture: RoutingCapture, chunk: Chunk,
                writer: RunWriter, gen_kwargs: dict[str, Any]) -> None:
    """Greedy (or user-configured) generation from one prompt, recording every token once.

    ``generate`` routes the prompt, then one new token per step; the last new token is never fed back,
    so one extra cached forward routes it. The result equals a plain forward over the final sequence.
    """
    seq_id = writer.n_sequences
    device = _device(model)
    prompt = torch.tensor([chunk.ids], device=device)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), return_dict_in_generate=True,
                         output_logits=True, pad_token_id=pad_id(tokenizer, model), **gen_kwargs)
    sequence = out.sequences[0]
    last = model(sequence[-1:].unsqueeze(0), past_key_values=out.past_key_values, use_cache=True)
    n_prompt, n_total = len(chunk.ids), int(sequence.shape[0])
    rows = RowMap(seq_id=np.full(n_total, seq_id, dtype=np.int32), pos=np.arange(n_total, dtype=np.int32),
                  keep=np.ones(n_total, dtype=bool))
    tables = routing_columns(capture.pop(), rows) | capture.contribution_columns(rows)
    rows.check_complete([s.layer for s in info.sites])

    step_logits = [*out.logits, last.logits[:, -1]]
    predicted = np.full(n_total, -1, dtype=np.int64)
    predicted[n_prompt - 1:] = torch.cat([s.argmax(-1) for s in step_logits]).cpu().numpy()[: n_total - n_prompt + 1]
    new_ids = sequence[n_prompt:].tolist()
    new_tokens = _incremental_texts(tokenizer, new_ids)
    full = Chunk(ids=sequence.tolist(), tokens=[*chunk.tokens, *new_tokens],
                 text=None if chunk.text is None else chunk.text + "".join(t or "" for t in new_tokens),
                 label=chunk.label, source=chunk.source)
    phase = ["prompt"] * n_prompt + ["generated"] * len(new_ids)
    tables["tokens"] = _token_columns([full], seq_id, predicted=pa.array(predicted, mask=predicted < 0, type=pa.int32()),
                                      phase=phase)
    tables["sequences"] = _sequence_columns([full], seq_id, prompt_lens=[n_prompt])
    writer.add(tables, n_tokens=n_total, n_sequences=1)


# -- columns -------------------------------------------------------------------------------------------


def _token_columns(batch: list[Chunk], seq_start: int, *, predicted: pa.Array, phase: list[str] | None = None) -> dict:
    lengths = [len(c.ids) for c in batch]
    return {
        "seq_id": np.repeat(np.arange(seq_start, seq_start + len(batch), dtype=np.int32), lengths),
        "pos": np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
        "token_id": np.concatenate([np.asarray(c.ids, dtype=np.int32) for c in batch]),
        "token": [t for c in batch for t in c.tokens],
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


def _layer_rows(info: MoEInfo) -> dict:
    return {
        "layer": [s.layer for s in info.sites],
        "block": [s.block for s in info.sites],
        "module": [s.name for s in info.sites],
        "kind": [s.kind for s in info.sites],
        "n_experts": [s.n_experts for s in info.sites],
        "top_k": [s.top_k for s in info.sites],
        "has_shared_expert": [s.has_shared_expert for s in info.sites],
    }


def _run_fields(model: Any, info: MoEInfo) -> dict[str, Any]:
    param = next(model.parameters())
    return {
        "model_type": info.model_type,
        "revision": getattr(model.config, "_commit_hash", None) or f"router-sha1:{router_fingerprint(info)}",
        "n_layers": info.n_layers,
        "moe_layers": [s.layer for s in info.sites],
        "n_experts": info.n_experts,
        "top_k": info.top_k,
        "n_shared_experts": info.n_shared_experts,
        "routing_function": info.routing_function,
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
                text = "".join(chunk.tokens[:room]) if all(t is not None for t in chunk.tokens[:room]) else None
                chunk = Chunk(chunk.ids[:room], chunk.tokens[:room], text, chunk.label, chunk.source)
        n_tokens += len(chunk.ids)
        yield chunk


def _batched(chunks: Iterable[Chunk], size: int) -> Iterator[list[Chunk]]:
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    it = iter(chunks)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _generate_kwargs(generate: int | dict[str, Any] | None) -> dict[str, Any] | None:
    if generate is None or generate is False:
        return None
    kwargs = {"max_new_tokens": generate} if isinstance(generate, int) else dict(generate)
    kwargs.setdefault("do_sample", False)
    return kwargs


def _incremental_texts(tokenizer: Any, ids: list[int]) -> list[str | None]:
    """Text each generated token adds, from decoding growing prefixes (keeps multibyte characters whole)."""
    if tokenizer is None:
        return [None] * len(ids)
    texts: list[str | None] = []
    previous = ""
    for i in range(len(ids)):
        current = tokenizer.decode(ids[: i + 1])
        common = len(os.path.commonprefix([previous, current]))
        cut, j = len(previous) - common, len(texts) - 1
        while cut > 0 and j >= 0:  # a completed multibyte character replaces earlier placeholder text
            take = min(cut, len(texts[j]))
            texts[j] = texts[j][: len(texts[j]) - take]
            cut, j = cut - take, j - 1
        texts.append(current[common:])
        previous = current
    return texts


def right_padded(batch: list[Chunk], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, S], attention_mask [B, S])`` on the CPU; right padding keeps every real token's position."""
    ids = torch.full((len(batch), max(len(c.ids) for c in batch)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, chunk in enumerate(batch):
        ids[i, : len(chunk.ids)] = torch.tensor(chunk.ids)
        mask[i, : len(chunk.ids)] = 1
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
