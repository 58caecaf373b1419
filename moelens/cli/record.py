"""`moelens record`: record a model's routing over files, folders, datasets or texts into the trace store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moelens.cli.common import (
    allow_random_router_option,
    app,
    console,
    db_option,
    device_map_option,
    device_option,
    dtype_option,
    resolve_model,
    revision_option,
    trust_remote_code_option,
)
from moelens.errors import InputError


@app.command()
def record(
    model: str = typer.Argument(..., help="Model folder or hub id; 'demo' for the bundled model; 'tiny:mixtral' etc. for a random tiny one."),
    data: list[str] = typer.Argument(None, help="Text/JSONL/CSV/Parquet files, folders (labelled by sub-folder), or hf:DATASET[:SPLIT]."),
    text: list[str] = typer.Option(None, "--text", "-t", help="A text to record (repeatable)."),
    db: Path = db_option(),
    label: Optional[str] = typer.Option(None, "--label", help="Label for every input sequence."),
    label_field: Optional[str] = typer.Option(None, "--label-field", help="JSONL/CSV/Parquet field holding the label."),
    text_field: str = typer.Option("text", "--text-field", help="JSONL/CSV/Parquet field holding the text."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many tokens."),
    max_sequences: Optional[int] = typer.Option(None, "--max-sequences", help="Stop after this many sequences."),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    seq_len: int = typer.Option(512, "--seq-len", help="Cut documents into sequences of at most this many tokens."),
    generate: Optional[int] = typer.Option(None, "--generate", help="Treat inputs as prompts and record N greedy new tokens each."),
    chat: bool = typer.Option(False, "--chat", help="Apply the tokenizer's chat template to each input (a JSONL 'messages' field, or the text as one user turn)."),
    add_special_tokens: bool = typer.Option(True, "--add-special-tokens/--no-add-special-tokens", help="Let the tokenizer add its BOS/EOS to plain texts."),
    device: Optional[str] = device_option(),
    device_map: Optional[str] = device_map_option(),
    dtype: str = dtype_option(),
    revision: Optional[str] = revision_option(),
    logits: bool = typer.Option(False, "--logits", help="Also store full router logits (large)."),
    contributions: bool = typer.Option(False, "--contributions", help="Also store expert output norms and block residual cosines (for the pruning scores; about one more experts pass)."),
    trust_remote_code: bool = trust_remote_code_option(),
    allow_random_router: bool = allow_random_router_option(),
    name: Optional[str] = typer.Option(None, "--name", help="A name for the run."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Record with N workers (Ray actors, one model each, one GPU each when the cluster has GPUs), each writing its own shard of one run; --db must be a Parquet dataset folder."),
    engine: str = typer.Option("ray", "--engine", help="Engine that runs the workers (ray)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to run the workers on (HEAD:6379 of `ray start --head`); default: a local Ray instance."),
) -> None:
    """Record the routing of MODEL over DATA into the trace store."""
    import itertools

    from moelens.recording.inputs import check_paths, documents, read_paths
    from moelens.store import TraceStore

    if not data and not text:
        raise InputError("nothing to record: pass data files/folders or --text 'some text'")
    if data:
        check_paths(data)
    inputs = itertools.chain(documents(text, label) if text else [],
                             read_paths(data, text_field=text_field, label_field=label_field, label=label) if data else [])
    kwargs = dict(batch_size=batch_size, seq_len=seq_len, max_tokens=max_tokens, max_sequences=max_sequences, logits=logits,
                  generate=generate, chat=chat, add_special_tokens=add_special_tokens, contributions=contributions, name=name)
    if workers is not None or address is not None:
        run_id = _record_with_workers(model, inputs, db, workers or 1, engine, address, kwargs,
                                      dict(device=device, device_map=device_map, dtype=dtype, revision=revision,
                                           trust_remote_code=trust_remote_code, allow_random_router=allow_random_router))
        _report(TraceStore(db), run_id, db)
        return
    store = TraceStore(db)
    lm, tokenizer, model_name = resolve_model(model, device=device, device_map=device_map, dtype=dtype, revision=revision,
                                              trust_remote_code=trust_remote_code, allow_random_router=allow_random_router)
    from moelens.recording.record import record as record_run  # torch: after a bad model name has failed fast

    run_id = record_run(lm, tokenizer, inputs, store=store, model_name=model_name, **kwargs)
    _report(store, run_id, db)


def _record_with_workers(model: str, inputs, db: Path, workers: int, engine: str, address: Optional[str], kwargs: dict,
                         load_kwargs: dict) -> int:
    """``--workers``: the driver cuts the inputs and runs one Ray actor per shard (`record_distributed`)."""
    from moelens.recording.distributed import dataset_store, record_distributed

    if engine != "ray":
        raise InputError(f"--engine {engine!r} is not supported; workers run on ray (--engine ray)")
    dataset_store(db)  # a DuckDB file is refused before a cluster is started
    return record_distributed(model, list(inputs), db, workers=workers, address=address, load_kwargs=load_kwargs, **kwargs)


def _report(store, run_id: int, db: Path) -> None:
    """Build the completed run's derived summaries (what the app and the count scores read), then say what landed."""
    from moelens.analysis.summaries import summarize  # recording never imports analysis; the command does

    tables = summarize(store, run_id, persist=False)  # one streamed pass, the file not held meanwhile
    with store.batch():  # the summaries and the report's reads through one connection (not two per summary)
        for name, table in tables.items():
            store.write_summary(run_id, name, table)
        info = store.runs().set_index("run_id").loc[run_id]
        empty = (store.run(run_id).get("metadata") or {}).get("empty_documents", 0)
    console.print(f"[green]run {run_id}[/] complete: {int(info.n_sequences)} sequences, {int(info.n_tokens)} tokens -> {db}")
    if empty:
        console.print(f"skipped {empty} empty document{'s' if empty != 1 else ''}")
