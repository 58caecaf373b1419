"""`moelens decode`: greedy or SCMoE self-contrast decoding from the command line, optionally under a routing change.

    moelens decode demo --text "12 + 7 =" --max-new-tokens 6
    moelens decode demo --prompts prompts.txt --scmoe --beta 0.5 --alpha 0.1 --weak-rank 2 --db traces.duckdb
    moelens decode tiny:mixtral --text "hello" --top-p 0.6 --k-max 4
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from moelens.cli.common import app, console, device_option, dtype_option, emit, format_option, resolve_model
from moelens.errors import InputError
from moelens.steering.spec import SteeringSpec


@app.command()
def decode(
    model: str = typer.Argument(..., help="Model folder or hub id; 'demo' for the bundled model; 'tiny:mixtral' etc."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line."),
    text: list[str] = typer.Option(None, "--text", "-t", help="A prompt (repeatable)."),
    scmoe: bool = typer.Option(False, "--scmoe", help="SCMoE self-contrast decoding (arXiv:2405.14507) instead of greedy."),
    beta: float = typer.Option(0.5, "--beta", help="SCMoE contrast strength: (1 + beta) log p_strong - beta log p_weak."),
    alpha: float = typer.Option(0.1, "--alpha", help="SCMoE plausibility: only tokens with p_strong >= alpha * max p_strong."),
    weak_rank: int = typer.Option(2, "--weak-rank", help="SCMoE weak model: each token routed to its rank-r expert only."),
    weak_spec: Optional[Path] = typer.Option(None, "--weak-spec", help="SCMoE weak model as a steering spec JSON file."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Steering spec JSON file applied to the (strong) model."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Experts per token in every MoE layer (strong model)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Dynamic top-p routing in every MoE layer (strong model)."),
    k_max: Optional[int] = typer.Option(None, "--k-max", help="At most this many experts per token with --top-p."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
    db: Optional[Path] = typer.Option(None, "--db", help="Record the strong routing of every token as a run here."),
    device: Optional[str] = device_option(),
    dtype: str = dtype_option(),
    fmt: str = format_option(),
) -> None:
    """Decode prompts greedily or with SCMoE, optionally with a changed routing (--spec, --top-k, --top-p)."""
    if fmt not in ("table", "csv", "json"):
        raise InputError(f"--format must be table, csv or json, not {fmt!r}")
    inputs = list(text or [])
    if prompts is not None:
        if not prompts.is_file():
            raise InputError(f"prompts file {prompts} does not exist")
        inputs += [line for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not inputs:
        raise InputError("no prompts: pass --text 'a prompt' or --prompts FILE")
    strong = _spec_file(spec)
    strong = SteeringSpec.build(strong, **{k: v for k, v in (("top_k", top_k), ("top_p", top_p), ("k_max", k_max))
                                           if v is not None})
    weak = _spec_file(weak_spec) if weak_spec is not None else weak_rank

    from moelens.steering.contrastive import contrastive_generate
    from moelens.store import TraceStore

    lm, tokenizer, _ = resolve_model(model, device=device, dtype=dtype)
    out = contrastive_generate(lm, tokenizer, inputs, weak=weak, strong=strong, beta=beta if scmoe else 0.0, alpha=alpha,
                               max_new_tokens=max_new_tokens, store=TraceStore(db) if db is not None else None,
                               progress=fmt == "table")
    frame = out[["prompt", "completion", "n_new", "stop"]]
    if fmt == "json":
        sys.stdout.write(json.dumps({"strong": strong.to_dict(), "scmoe": scmoe, "run_id": out["run_id"].iloc[0],
                                     "outputs": frame.to_dict("records")}, default=str) + "\n")
        return
    emit(frame, fmt, title="scmoe" if scmoe else "greedy")
    if fmt == "table" and db is not None:
        console.print(f"strong routing recorded in {db} as run {out['run_id'].iloc[0]}")


def _spec_file(path: Path | None) -> SteeringSpec:
    if path is None:
        return SteeringSpec()
    if not path.is_file():
        raise InputError(f"spec file {path} does not exist")
    return SteeringSpec.from_json(path.read_text(encoding="utf-8"))
