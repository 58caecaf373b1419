"""Record one run with many workers: Ray actors, one model each, each writing its own shard of a Parquet dataset.

The driver cuts the inputs into sequences once, so sequence ids are global and do not depend on which worker
runs first; it splits them into contiguous shards of whole sequences (balanced by tokens), creates the run and
marks it ``complete`` only after every shard's completion marker has landed. A worker that raises or dies
(killed, out of memory, node lost) marks the run ``failed`` with its reason; its shard never gets a marker, so
nothing of it looks complete. Works on a laptop (a local Ray instance) and on a cluster (``address``).
"""

from __future__ import annotations

import inspect
import os
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moelens.errors import InputError, MoelensError
from moelens.recording.inputs import documents
from moelens.recording.tokenize import Chunk, chunk_documents
from moelens.recording.writer import ShardTarget
from moelens.store import TraceStore

#: Keyword arguments of `record` that decide how inputs are cut into sequences (used by the driver only).
_CUTTING = ("labels", "seq_len", "max_tokens", "max_sequences", "chat", "add_special_tokens", "text_field", "label_field")


def dataset_store(path: str | Path) -> TraceStore:
    """The Parquet dataset at ``path`` (created if new); workers cannot share a DuckDB file (it has one writer)."""
    path = Path(path)
    if path.suffix == ".duckdb" or path.is_file():
        raise InputError(f"--workers writes a Parquet dataset folder, and {path} is a DuckDB file (one writer at a time); "
                         "give a folder, e.g. --db traces/dataset")
    return TraceStore(path, layout="parquet")


def record_distributed(model_spec: str, inputs: Any, store_dir: str | Path, *, workers: int = 2, address: str | None = None,
                       load_kwargs: dict | None = None, name: str | None = None, metadata: dict | None = None,
                       progress: bool = True, on_dispatch: Callable[[list], None] | None = None, **record_kwargs: Any) -> int:
    """Record ``model_spec`` (as `moelens record` takes it) over ``inputs`` with ``workers`` Ray actors into one run
    of the dataset at ``store_dir``; return the run id. ``address`` joins a running cluster (``ray start --head``);
    without it a running ``ray.init`` is used, else a local instance is started (and shut down after). Each actor
    takes one GPU when the cluster has GPUs, else one CPU, and runs torch with one thread. ``load_kwargs`` go to
    the model loader (device, dtype, revision, ...); other keyword arguments to `moelens.record` (``generate`` and
    ``batch_size`` included: each worker generates its shard's prompts in batches, as one process would).
    ``on_dispatch(actors)`` is called once every shard is sent (lets a test kill a worker mid-run)."""
    if workers < 1:
        raise InputError(f"--workers must be at least 1, not {workers}")
    from moelens.recording.record import _generate_kwargs, _in_vocabulary, _limited, record, recording_metadata

    opts = {**{k: p.default for k, p in inspect.signature(record).parameters.items() if p.default is not p.empty},
            **record_kwargs}  # record()'s own defaults, so the driver cuts exactly as a single process would

    store = dataset_store(store_dir)
    gen_kwargs = _generate_kwargs(opts["generate"])  # a bad generate fails before any worker starts
    ray, started = _connect(address, workers)
    actors: list = []
    run_id = None
    try:
        gpus = _check_capacity(ray.cluster_resources(), workers)
        recorder = ray.remote(num_cpus=1, num_gpus=gpus)(_Recorder)
        actors = [recorder.remote(model_spec, load_kwargs or {}) for _ in range(workers)]
        try:
            tokenizer, fields, layers, n_rows, gen_batch = ray.get(actors[0].describe.remote(gen_kwargs, opts["batch_size"],
                                                                                         opts["contributions"]))
        except Exception as exc:  # the model spec cannot be loaded: say why, as a single process would
            cause = getattr(exc, "cause", None)
            raise cause if isinstance(cause, MoelensError) else MoelensError(f"a worker could not load {model_spec}: "
                                                                             f"{_worker_reason(exc)}") from None
        for key in _CUTTING:
            record_kwargs.pop(key, None)  # the driver cuts; workers get the cut sequences
        counts: Counter = Counter()
        labels = opts["labels"]
        docs = documents(inputs, labels if labels is None or isinstance(labels, str) else list(labels),
                         text_field=opts["text_field"], label_field=opts["label_field"])
        chunks = list(_in_vocabulary(_limited(
            chunk_documents(docs, tokenizer, opts["seq_len"], chat=opts["chat"], add_special_tokens=opts["add_special_tokens"],
                            add_generation_prompt=gen_kwargs is not None, counts=counts),
            opts["max_tokens"], opts["max_sequences"]), n_rows))
        if not chunks:
            raise InputError("nothing to record: the inputs contain no text or tokens")
        shards = split_contiguous([len(c.ids) for c in chunks], workers)

        run_metadata = recording_metadata(metadata, gen_kwargs, gen_batch,
                                          **{k: opts[k] for k in ("seq_len", "batch_size", "logits", "chat",
                                                                  "add_special_tokens", "contributions")},
                                          empty_documents=counts["empty_documents"], workers=len(shards), engine="ray")
        run_id = store.create_run(record_kwargs.pop("model_name", None) or model_spec, name=name, **fields, metadata=run_metadata,
                                  n_shards=len(shards))
        store.append(run_id, {"layers": layers})
        pending = {actors[s].record.remote(str(store.path), ShardTarget(run_id, s, start), chunks[start:stop], record_kwargs): s
                   for s, (start, stop) in enumerate(shards)}
        del chunks
        if on_dispatch is not None:
            on_dispatch(actors)
        _wait_all(ray, pending, progress)
        store.finish_run(run_id, "complete")  # refuses if any shard with rows lacks its marker
        return run_id
    except BaseException as exc:
        if run_id is not None:
            reason = "interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
            store.finish_run(run_id, "failed", error=reason)
        raise
    finally:
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def split_contiguous(lengths: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut ``len(lengths)`` sequences into at most ``parts`` non-empty contiguous ``(start, stop)`` ranges of
    about equal token counts (boundary ``i`` falls where the running total first reaches ``i/parts`` of it)."""
    total, running, bounds = sum(lengths), 0, [0]
    for i, n in enumerate(lengths):
        running += n
        if len(bounds) < parts and running * parts >= total * len(bounds) and i + 1 < len(lengths):
            bounds.append(i + 1)
    bounds.append(len(lengths))
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _wait_all(ray: Any, pending: dict, progress: bool) -> None:
    """Wait for every shard; the first worker error (raised or died) stops the run with its reason."""
    from tqdm.auto import tqdm

    with tqdm(total=len(pending), unit="shard", desc="workers", disable=not progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            shard = pending.pop(done[0])
            try:
                ray.get(done[0])
            except Exception as exc:  # RayTaskError (the worker raised) or RayActorError (it died)
                raise MoelensError(f"worker for shard {shard} failed: {_worker_reason(exc)}") from None
            bar.update()


def _worker_reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no reason given'}"


def _connect(address: str | None, workers: int) -> tuple[Any, bool]:
    """``(ray, started_here)``: join ``address``, reuse a running ``ray.init``, or start a local instance."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - ray is a dependency
        raise InputError("--workers needs the 'ray' package (pip install 'ray[default]')") from exc
    if address is not None:
        _check_reachable(address)
        if ray.is_initialized():
            ray.shutdown()
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # ConnectionError, or a timeout while the GCS does not answer
            raise InputError(f"cannot reach a Ray cluster at {address} ({type(exc).__name__}); start one with "
                             "`ray start --head` on the head machine and pass its HEAD:6379") from None
        return ray, True
    if ray.is_initialized():
        return ray, False
    ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    return ray, True


def _check_capacity(resources: dict, workers: int) -> int:
    """GPUs per actor (1 when the cluster has GPUs, else 0); refuse more actors than the cluster can place at once
    (Ray would keep the extra ones pending forever)."""
    kind, have = ("GPU", resources.get("GPU", 0)) if resources.get("GPU", 0) >= 1 else ("CPU", resources.get("CPU", 0))
    if workers > have:
        raise InputError(f"--workers {workers} needs {workers} {kind}s (one per worker) and the Ray cluster has {have:g}; "
                         f"use --workers {int(have)} or add machines (ray start --address HEAD:6379)")
    return 1 if kind == "GPU" else 0


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a ``HOST:PORT`` nobody listens on (``ray.init`` would keep retrying for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and the like: ray resolves them itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise InputError(f"cannot reach a Ray cluster at {address} ({exc.strerror or type(exc).__name__}); start one with "
                         "`ray start --head` on the head machine and pass its HEAD:6379") from None


class _Recorder:
    """One worker: loads the model from its spec once, then records the shards it is given."""

    def __init__(self, model_spec: str, load_kwargs: dict):
        from moelens.threads import THREADS_ENV

        os.environ[THREADS_ENV] = "1"  # one torch thread per actor: actors share the machine's cores
        import torch

        from moelens.cli.common import resolve_model

        if torch.cuda.is_available() and not load_kwargs.get("device") and not load_kwargs.get("device_map"):
            load_kwargs = {**load_kwargs, "device": "cuda"}  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        self.load_error: Exception | None = None
        try:
            self.model, self.tokenizer, _ = resolve_model(model_spec, **load_kwargs)
        except Exception as exc:  # kept for describe(): an error in a task keeps its type, one in __init__ does not
            self.load_error = exc
        torch.set_num_threads(1)

    def describe(self, gen_kwargs: dict | None, batch_size: int, contributions: bool) -> tuple:
        """What the driver needs to cut the inputs and create the run: tokenizer, run fields, layer rows, vocab
        rows, and the generation batch size (None without generation). Refuses, before the run exists, what this
        model cannot record (generation on an encoder-decoder, contributions of unsupported experts)."""
        from moelens.adapters import find_routers, unwrap
        from moelens.adapters.contributions import check_supported

        if self.load_error is not None:
            raise self.load_error
        from moelens.recording.record import _check_vocabulary, generation_batch_size, layer_rows, run_fields

        model = unwrap(self.model)
        info = find_routers(model)
        if contributions:
            check_supported(info)
        return (self.tokenizer, run_fields(model, info), layer_rows(info), _check_vocabulary(self.tokenizer, model),
                generation_batch_size(model, info, gen_kwargs, batch_size))

    def record(self, store_dir: str, target: ShardTarget, chunks: list[Chunk], record_kwargs: dict) -> int:
        from moelens.recording.record import record

        record(self.model, self.tokenizer, chunks, store=TraceStore(store_dir), into=target, progress=False, **record_kwargs)
        return sum(len(c.ids) for c in chunks)

