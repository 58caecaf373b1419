"""`moelens import-engine`: store a serving engine's routed-expert ids (vLLM, SGLang, TensorRT-LLM) as a run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moelens.cli.common import (
    app,
    console,
    db_option,
    device_map_option,
    device_option,
    dtype_option,
    emit,
    err_console,
    resolve_model,
    trust_remote_code_option,
)
from moelens.errors import InputError


@app.command("import-engine")
def import_engine(
    file: Path = typer.Argument(..., help="JSONL of request outputs, one request per line (README: Serving-engine traces)."),
    fmt: str = typer.Option(..., "--format", help="vllm | sglang | trtllm"),
    model: str = typer.Option(..., "--model", help="The model the engine served (folder, hub id, demo, tiny:TYPE): its MoE layer ids and tokenizer."),
    db: Path = db_option(),
    engine_version: Optional[str] = typer.Option(None, "--engine-version", help="Stored in the run's metadata."),
    name: Optional[str] = typer.Option(None, "--name", help="A name for the run."),
    label: Optional[str] = typer.Option(None, "--label", help="Label for requests without a 'label' field."),
    teacher_force: bool = typer.Option(False, "--teacher-force", help="Also re-run the same tokens through the transformers model (fills weights) and compare the two runs."),
    device: Optional[str] = device_option(),
    device_map: Optional[str] = device_map_option(),
    dtype: str = dtype_option(),
    trust_remote_code: bool = trust_remote_code_option(),
) -> None:
    """Store a serving engine's routed-expert ids as a run (weights NULL); --teacher-force adds a transformers run."""
    from moelens.adapters import find_routers
    from moelens.recording.engines import import_engine_file, layout_model, teacher_force as force
    from moelens.store import TraceStore

    if not file.is_file():
        raise InputError(f"engine output file {file} does not exist")
    store = TraceStore(db)
    if teacher_force:
        lm, tokenizer, model_name = resolve_model(model, device=device, device_map=device_map, dtype=dtype,
                                                  trust_remote_code=trust_remote_code)
    else:  # the layout from the config alone: no weights are loaded
        lm, model_name = layout_model(model, trust_remote_code=trust_remote_code), model
        tokenizer = _tokenizer_or_none(model, trust_remote_code)
    run_id = import_engine_file(file, fmt, store=store, info=find_routers(lm), tokenizer=tokenizer, model_name=model_name,
                                engine_version=engine_version, name=name, label=label)
    console.print(f"[green]run {run_id}[/] imported from {fmt} -> {db}")
    if teacher_force:
        from moelens.analysis import run_agreement

        forced = force(lm, tokenizer, store, run_id)
        console.print(f"[green]run {forced}[/]: the same tokens teacher-forced through the transformers model")
        emit(run_agreement(store, run_id, forced), "table", title=f"engine (run {run_id}) vs transformers (run {forced})")


def _tokenizer_or_none(spec: str, trust_remote_code: bool):
    """The model's tokenizer, for exact token text; None (text left NULL, said so) when there is none."""
    if spec.startswith("tiny:"):
        from moelens.tiny import tiny_config, tiny_tokenizer

        return tiny_tokenizer(tiny_config(spec[5:]).vocab_size)
    from transformers import AutoTokenizer

    from moelens.demo import model_path

    spec = model_path(spec)
    try:
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        err_console.print(f"[yellow]no tokenizer found for {spec}[/]: token text is left NULL")
        return None
