"""The ``lmforge`` command line: one sub-command per stage, plus ``run`` (recipes), ``runs`` and ``lineage``.

Thin by design: it parses flags into the stage's config model, calls the stage's Python API and prints.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.tree import Tree

from lmforge.config import ConfigError, command_from_config
from lmforge.progress import console

app = typer.Typer(help="lmforge: raw web data → corpus → tokenizer → pretraining → eval → serving, with lineage.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Data stage: read, extract, clean, filter and dedup raw documents.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Tokenizer stage: train a BPE tokenizer and pack token shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")

# Key metrics shown in summaries, per stage kind.
HEADLINE = {
    "data": ["docs_in", "docs_kept", "docs_dropped", "docs_per_s"],
    "tokenizer": ["vocab_size", "train_tokens", "val_tokens", "bytes_per_token"],
    "pretrain": ["params", "steps", "final_train_loss", "final_val_loss", "tokens_per_s"],
    "eval": ["val_loss", "val_ppl", "val_bpb"],
    "serve_smoke": ["latency_s", "tokens_per_s"],
}


def _stage_command(module_name: str, default_out: str):
    import importlib

    module = importlib.import_module(module_name)
    return command_from_config(module.Config, module.run, module.Config.__doc__, default_out=default_out)


def _register() -> None:
    data_app.command("run", help="Run the data pipeline on raw inputs.")(_stage_command("lmforge.data.stage", "data"))
    tokenizer_app.command("train", help="Train a BPE tokenizer on a data artifact and pack token shards.")(
        _stage_command("lmforge.tokenizer.stage", "tokenizer"))
    app.command("pretrain", help="Pretrain a Llama model on a tokenizer artifact.")(
        _stage_command("lmforge.train.pretrain", "pretrain"))
    app.command("eval", help="Evaluate a model: held-out loss, perplexity, bits per byte, samples.")(
        _stage_command("lmforge.eval.stage", "eval"))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


@app.command("run")
def run_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    workspace: Optional[Path] = typer.Option(None, help="Folder for the stages' artifacts [default: from the recipe]."),
    force: list[str] = typer.Option([], help="Re-run this stage even if up to date (repeatable)."),
    only: list[str] = typer.Option([], help="Run only this stage (repeatable)."),
) -> None:
    """Run a recipe: every stage in order, skipping those whose inputs and config did not change."""
    from lmforge.recipe import load_recipe, run_recipe

    try:
        rec = load_recipe(recipe, workspace)
        results = run_recipe(rec, force=force, only=only)
    except ConfigError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None
    table = Table(title=f"recipe {rec.name}: summary", show_lines=False)
    for col in ("stage", "status", "time", "artifact", "key metrics"):
        table.add_column(col)
    for r in results:
        keys = HEADLINE.get(r.kind, [])
        metrics = ", ".join(f"{k}={_fmt(r.manifest.metrics[k])}" for k in keys if k in r.manifest.metrics)
        table.add_row(r.name, "[green]ran[/]" if r.ran else "[dim]skipped (up to date)[/]", f"{r.seconds:.1f}s",
                      str(r.folder), metrics)
    console.print(table)
    models = [r.folder for r in results if r.kind == "pretrain"]
    if models:
        console.print(f"Chat with the model:   [bold]lmforge chat {models[-1]}[/]")
        console.print(f"Serve it (OpenAI API): [bold]lmforge serve {models[-1]}[/]")
        console.print(f"Where it came from:    [bold]lmforge lineage {models[-1]}[/]")


@app.command("serve")
def serve_cmd(
    model: Path = typer.Argument(..., help="Model folder (HF layout with tokenizer files)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    model_name: Optional[str] = typer.Option(None, help="Model id clients use [default: the folder name]."),
    max_num_seqs: int = typer.Option(4, help="Requests decoded together (continuous batching)."),
    max_model_len: int = typer.Option(2048, help="Cap on prompt + completion tokens (and the model's context)."),
) -> None:
    """Serve a model over the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from lmforge.serve.api import serve

    serve(str(model), host=host, port=port, model_name=model_name, max_num_seqs=max_num_seqs,
          max_model_len=max_model_len)


@app.command("chat")
def chat_cmd(model: Path = typer.Argument(..., help="Model folder.")) -> None:
    """Chat with a model in the terminal (streams answers; Ctrl-D to quit)."""
    from lmforge.serve.repl import chat_repl

    chat_repl(str(model))


@app.command("runs")
def runs_cmd(
    stage: Optional[str] = typer.Option(None, help="Only runs of this stage."),
    limit: int = typer.Option(30, help="At most this many runs."),
) -> None:
    """List runs recorded in the registry ($LMFORGE_HOME/registry.sqlite), newest first."""
    from lmforge import registry

    rows = registry.list_runs(stage, limit)
    table = Table(title=f"runs in {registry.registry_path()}")
    for col in ("run", "stage", "status", "started", "time", "artifact", "key metrics"):
        table.add_column(col)
    for r in rows:
        metrics = json.loads(r["metrics"] or "{}")
        keys = HEADLINE.get(r["stage"], [])
        dur = f"{r['finished_at'] - r['started_at']:.1f}s" if r["finished_at"] else "-"
        colour = {"done": "green", "failed": "red"}.get(r["status"], "yellow")
        table.add_row(r["run_id"], r["stage"], f"[{colour}]{r['status']}[/]",
                      datetime.fromtimestamp(r["started_at"]).strftime("%Y-%m-%d %H:%M:%S"), dur, r["path"],
                      ", ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics))
    console.print(table)


@app.command("lineage")
def lineage_cmd(
    path: Path = typer.Argument(..., help="An artifact folder (a model, an eval, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the lineage tree as JSON."),
) -> None:
    """Show which runs, data and configs produced an artifact."""
    from lmforge import registry

    tree = registry.lineage(path)
    if tree.get("raw"):
        console.print(f"[red]{path} was not produced by any run recorded in {registry.registry_path()}[/]")
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(tree, indent=2))
        return

    def add(node: Tree, item: dict, role: str) -> None:
        if item.get("raw"):
            node.add(f"[cyan]{role}[/]: raw input {item['path']} [dim]({item['fingerprint']})[/]")
            return
        keys = HEADLINE.get(item["stage"], [])
        metrics = ", ".join(f"{k}={_fmt(item['metrics'][k])}" for k in keys if k in item["metrics"])
        child = node.add(f"[cyan]{role}[/]: [bold]{item['stage']}[/] {item['path']} [dim]run {item['run_id']}[/] {metrics}")
        for r, sub in item["inputs"].items():
            add(child, sub, r)

    root = Tree(f"lineage of {Path(path).resolve()}")
    add(root, tree, tree["stage"])
    console.print(root)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _register()
    try:
        app()
    except ConfigError as err:
        console.print(f"[red]{err}[/]")
        sys.exit(2)


if __name__ == "__main__":
    main()
