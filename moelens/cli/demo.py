"""`moelens demo | demo train | demo corpus`: the bundled demo model, its recording and its rebuild."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from moelens.cli.common import app, console, db_option, emit

demo_app = typer.Typer(help="The bundled demo: record it and open the workbench, or rebuild it.",
                       invoke_without_command=True, no_args_is_help=False)
app.add_typer(demo_app, name="demo")


@demo_app.callback(invoke_without_command=True)
def demo(
    ctx: typer.Context,
    db: Path = db_option("Trace store to record into."),
    no_app: bool = typer.Option(False, "--no-app", help="Print a summary instead of opening the workbench."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Quick try: record this many held-out tokens, sampled from the start of every domain's documents."),
    again: bool = typer.Option(False, "--again", help="Record again even if the store already has the demo runs."),
) -> None:
    """Record the bundled demo model over its held-out corpus (plus generations and the early checkpoint), then open the workbench."""
    if ctx.invoked_subcommand is not None:
        return
    from moelens.demo.run import demo_summary, run_demo
    from moelens.store import TraceStore

    runs = run_demo(db, max_tokens=max_tokens, again=again)
    if not no_app:
        from moelens.app_launcher import launch

        launch(Path(db))
        return
    store = TraceStore(db, read_only=True)
    for title, table in demo_summary(store, runs).items():
        emit(table, "table", title=title)
    console.print(f"Open the workbench with: moelens app --db {db}")


@demo_app.command("train")
def demo_train(
    out: Path = typer.Option(Path("demo-model"), "--out", help="Folder for the trained model and its early checkpoint."),
    steps: int = typer.Option(600, "--steps"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Re-train the demo MoE from its seed (about 10 minutes on 2 CPU cores)."""
    from moelens.demo.train import train_demo

    train_demo(out, steps=steps, seed=seed)


@demo_app.command("corpus")
def demo_corpus(out: Path = typer.Option(Path("demo-corpus"), "--out", help="Folder for the rebuilt corpus.")) -> None:
    """Rebuild the demo corpus from this machine's offline sources and compare it with the shipped manifest."""
    from moelens.demo import DATA_DIR
    from moelens.demo.corpus import build_corpus

    built = build_corpus(out)
    shipped = json.loads((DATA_DIR / "MANIFEST.json").read_text(encoding="utf-8"))
    for name, info in built["files"].items():
        same = info["sha256"] == shipped["files"].get(name, {}).get("sha256")
        verdict = "[green]identical to the shipped file[/]" if same else "[yellow]differs from the shipped file[/]"
        console.print(f"{out / name}: {info['docs']} documents, {info['bytes']:,} bytes, {verdict}")
    for domain, entry in built["domains"].items():
        if entry != shipped["domains"].get(domain):
            console.print(f"[yellow]{domain}[/]: this machine's sources differ from the shipped build (see MANIFEST.json)")
