"""`moelens prune`: rank experts on a recorded run, write the pruned checkpoint and/or evaluate it against controls.

    moelens prune demo --run 3 --score reap --keep 0.5 --out pruned/
    moelens prune demo --run 3 --score easy_ep --keep 0.75 --evaluate heldout/ --n-random 5
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moelens.cli.analyze import _split_params
from moelens.cli.common import app, console, db_option, device_option, dtype_option, emit, format_option, resolve_model
from moelens.errors import InputError


@app.command()
def prune(
    model: str = typer.Argument(..., help="The model the run was recorded from: folder or hub id, 'demo', 'tiny:TYPE'."),
    run: int = typer.Option(..., "--run", help="Calibration run (recorded with --contributions for norm-based scores)."),
    score: str = typer.Option("reap", "--score", help="reap | ean | man | frequency | easy_ep | esft"),
    keep: float = typer.Option(0.5, "--keep", help="Fraction of routed experts kept."),
    per_layer: bool = typer.Option(False, "--per-layer/--uniform", help="Different counts per layer (global ranking) or the same in every layer."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the pruned Hugging Face folder here (safetensors)."),
    evaluate: list[str] = typer.Option(None, "--evaluate", help="Held-out data (files/folders) to compare the loss before/after, vs frequency and random prunings."),
    n_random: int = typer.Option(5, "--n-random", help="Random prunings at the same ratio (with --evaluate)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first random pruning."),
    param: list[str] = typer.Option(None, "--param", "-p", help="Score parameter key=value, e.g. gate=softmax_renorm."),
    label_field: Optional[str] = typer.Option(None, "--label-field", help="JSONL/CSV/Parquet field holding the label."),
    db: Path = db_option("Trace store holding the run."),
    device: Optional[str] = device_option(),
    dtype: str = dtype_option(),
    fmt: str = format_option(),
) -> None:
    """Remove the least important experts of MODEL by a score of a recorded run."""
    from moelens.analysis.registry import SCORES
    from moelens.pruning.prune import PRUNE_SCORES, prune as prune_model
    from moelens.recording.inputs import check_paths, read_paths
    from moelens.store import TraceStore

    if score not in PRUNE_SCORES:
        raise InputError(f"--score must be one of {', '.join(PRUNE_SCORES)}, not {score!r}")
    if evaluate:
        check_paths(evaluate)
    if out is not None and out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out} exists and is not empty; choose a new folder")
    store = TraceStore(db, read_only=True)
    store.run(run)
    params = SCORES[score].parse(_split_params(param))
    lm, tokenizer, _ = resolve_model(model, device=device, dtype=dtype)
    plan = prune_model(lm, store, run, score=score, keep=keep, per_layer=per_layer, out=out, tokenizer=tokenizer,
                       score_params=params)
    import pandas as pd

    kept = pd.DataFrame([{"layer": layer, "kept": len(ids), "removed": " ".join(str(e) for l2, e in plan.removed if l2 == layer)}
                         for layer, ids in plan.kept.items()])
    emit(kept, fmt, title=f"{score}: keep {keep:.0%}")
    if out is not None and fmt == "table":
        console.print(f"[green]pruned checkpoint[/] -> {out} (load with AutoModelForCausalLM.from_pretrained)")
    if evaluate:
        from moelens.pruning.evaluate import evaluate_pruning

        docs = list(read_paths(evaluate, label_field=label_field))
        scores = (score,) if score == "frequency" else (score, "frequency")
        result = evaluate_pruning(lm, tokenizer, store, run, docs, scores=scores, keep=(keep,), per_layer=per_layer,
                                  n_random=n_random, seed=seed, score_params={score: params})
        emit(result, fmt, title="held-out loss (nats/token); random = mean and std over the random prunings")
