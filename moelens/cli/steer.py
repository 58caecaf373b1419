"""`moelens steer`: run a steering experiment from the command line.

    moelens steer demo --disable 1:3 --disable 2:7 --data corpus/ --n-random 5
    moelens steer tiny:mixtral --spec spec.json --prompts prompts.txt --generate 20

The spec comes from ``--spec FILE`` (JSON, see `SteeringSpec.to_dict`) plus any ``--disable/--force/--boost/
--gate-scale`` flags, which add to it. Inputs are ``--data`` files/folders, ``--text`` strings and ``--prompts``
(one prompt per line). The baseline, steered and control runs are recorded in ``--db`` unless ``--no-save``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from moelens.cli.common import (
    allow_random_router_option,
    app,
    check_format,
    console,
    db_option,
    device_map_option,
    device_option,
    dtype_option,
    emit,
    format_option,
    resolve_model,
    revision_option,
    trust_remote_code_option,
)
from moelens.errors import InputError, SteeringError
from moelens.steering.spec import SteeringSpec, parse_pair, parse_pair_value


@app.command()
def steer(
    model: str = typer.Argument(..., help="Model folder or hub id; 'demo' for the bundled model; 'tiny:mixtral' etc."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Steering spec JSON file."),
    disable: list[str] = typer.Option(None, "--disable", help="Disable expert LAYER:EXPERT (repeatable)."),
    force: list[str] = typer.Option(None, "--force", help="Force expert LAYER:EXPERT into every token's top-k (repeatable)."),
    boost: list[str] = typer.Option(None, "--boost", help="Add VALUE to expert LAYER:EXPERT's router logit: L:E=V (repeatable)."),
    gate_scale: list[str] = typer.Option(None, "--gate-scale", help="Multiply a routed expert's gate weight: L:E=BETA (repeatable)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="How --disable acts: reroute (default) | zero."),
    boost_unit: Optional[str] = typer.Option(None, "--boost-unit", help="logit (default) | std (per-layer logit std, calibrated on the inputs)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line."),
    data: list[str] = typer.Option(None, "--data", help="Text/JSONL/CSV/Parquet files or folders (labelled by sub-folder)."),
    text: list[str] = typer.Option(None, "--text", "-t", help="An input text (repeatable)."),
    label_field: Optional[str] = typer.Option(None, "--label-field", help="JSONL/CSV/Parquet field holding the label."),
    generate: int = typer.Option(0, "--generate", help="Also generate N greedy tokens per input, baseline vs steered."),
    n_random: int = typer.Option(5, "--n-random", help="Random-expert controls (same experts per layer, other ids)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first random control."),
    seq_len: int = typer.Option(256, "--seq-len", help="Cut inputs into sequences of at most this many tokens."),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    db: Path = db_option("Trace store the runs are recorded in."),
    no_save: bool = typer.Option(False, "--no-save", help="Only report the effects: record no runs in --db."),
    device: Optional[str] = device_option(),
    device_map: Optional[str] = device_map_option(),
    dtype: str = dtype_option(),
    revision: Optional[str] = revision_option(),
    trust_remote_code: bool = trust_remote_code_option(),
    allow_random_router: bool = allow_random_router_option(),
    fmt: str = format_option(),
) -> None:
    """Steer MODEL's routing and compare it with the unmodified model and random-expert controls."""
    steering = _spec(spec, disable, force, boost, gate_scale, mode, boost_unit)
    if steering.is_empty:
        raise SteeringError("nothing to steer: pass --spec FILE or --disable/--force/--boost/--gate-scale L:E")
    inputs = _inputs(prompts, data, text, label_field)
    check_format(fmt)

    from moelens.steering.experiment import run_experiment
    from moelens.store import TraceStore

    store = None if no_save else TraceStore(db)
    lm, tokenizer, _ = resolve_model(model, device=device, device_map=device_map, dtype=dtype, revision=revision,
                                     trust_remote_code=trust_remote_code, allow_random_router=allow_random_router)
    result = run_experiment(lm, tokenizer, steering, inputs, store=store, n_random=n_random, seed=seed,
                            generate=generate or None, batch_size=batch_size, seq_len=seq_len, progress=fmt == "table")
    routing = (result.routing.groupby(["variant", "layer"], sort=False)
               .apply(lambda g: (g["share_changed"] * g["n_tokens"]).sum() / g["n_tokens"].sum(), include_groups=False)
               .rename("share_changed").reset_index())
    tables = {"summary": result.summary(), "routing": routing}
    if result.generations is not None:
        tables["generations"] = result.generations
    runs = {"baseline": result.baseline_run, "steered": result.steered_run, "controls": result.control_runs}
    if fmt == "json":
        records = {k: v.astype(object).where(v.notna(), None).to_dict("records") for k, v in tables.items()}
        out = {"spec": result.spec.to_dict(), "runs": runs, **records}
        sys.stdout.write(json.dumps(out, default=str) + "\n")
        return
    if fmt == "table":
        console.print(f"[bold]spec[/]: {result.spec.describe()}", highlight=False)
    for name, df in tables.items():
        emit(df, fmt, title=name)
    if fmt == "table" and store is not None:
        console.print(f"runs in {db}: baseline {runs['baseline']}, steered {runs['steered']}, controls {runs['controls']}")


def _spec(path: Path | None, disable: list[str] | None, force: list[str] | None, boost: list[str] | None,
          gate_scale: list[str] | None, mode: str | None, boost_unit: str | None) -> SteeringSpec:
    """The spec file (if any) with the command-line pairs added."""
    if path is not None and not path.is_file():
        raise InputError(f"spec file {path} does not exist")
    base = SteeringSpec.from_json(path.read_text(encoding="utf-8")) if path is not None else SteeringSpec()
    fields = {
        "disable": [*base.disable, *map(parse_pair, disable or [])],
        "force": [*base.force, *map(parse_pair, force or [])],
        "boost": dict([*base.boost, *map(parse_pair_value, boost or [])]),
        "gate_scale": dict([*base.gate_scale, *map(parse_pair_value, gate_scale or [])]),
    }
    if mode is not None:
        fields["mode"] = mode
    if boost_unit is not None:
        fields["boost_unit"] = boost_unit
    return SteeringSpec.build(base, **fields)


def _inputs(prompts: Path | None, data: list[str] | None, text: list[str] | None, label_field: str | None) -> list:
    """Documents from ``--prompts`` (one per line), ``--data`` and ``--text``; checked before any model loads."""
    from moelens.recording import Document, read_paths

    docs = [Document(text=t, source=f"text[{i}]") for i, t in enumerate(text or [])]
    if prompts is not None:
        if not prompts.is_file():
            raise InputError(f"prompts file {prompts} does not exist")
        lines = prompts.read_text(encoding="utf-8").splitlines()
        docs += [Document(text=line, source=f"{prompts.name}:{n + 1}") for n, line in enumerate(lines) if line.strip()]
    if data:
        docs += list(read_paths(data, label_field=label_field))
    if not docs:
        raise InputError("no inputs: pass --data FILES, --text 'some text' or --prompts FILE")
    return docs
