"""Data ablations: what did each data-cleaning decision do to model quality?

One raw corpus, several variants of the data stage's config (no filters / rules only / rules + dedup ...).  Each
variant runs data → tokenizer → pretrain (the same proxy model and token budget for all) → eval on the same tasks
(tokenizer-independent bits-per-byte on held-out books and accuracy tasks, so variants with different tokenizers
compare).  Every step is an ordinary stage run in ``<out>/<variant>/<stage>``, so re-running skips what is up to date
(fingerprints) and a changed variant re-runs only its own chain.

A variant may use a quality classifier: set its data override ``quality_model: "@quality"`` and the classifier
described by ``quality`` (good reference text vs. raw web text, :func:`lmforge.data.quality.train_quality`) is trained
once into ``<out>/quality_classifier`` (cached by fingerprint like any stage) and its folder is put in place of
``@quality``.

Writes ``ablation.json``, ``ablation.md`` (table with 95% bootstrap CIs, the difference to the first variant with a
paired bootstrap CI over the same items, documents kept, per-stage seconds) and ``ablation.png`` (score per variant
with CI error bars).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmforge.artifacts import Manifest, write_json, write_text
from lmforge.config import StageConfig, validate
from lmforge.data import stage as data_stage
from lmforge.eval import metrics as M
from lmforge.eval import stage as eval_stage
from lmforge.progress import console
from lmforge.stages import begin, finished, overwrite_allowed
from lmforge.tokenizer import stage as tokenizer_stage
from lmforge.train import pretrain as pretrain_stage

QUALITY_REF = "@quality"
QUALITY_DIR = "quality_classifier"  # <out>/quality_classifier holds the trained classifier
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "no_filters": {"gopher_repetition": False, "gopher_quality": False, "dedup": False},
    "rules": {"dedup": False},
    "rules_dedup": {},
    # FineWeb-style heuristics on top: line junk removal, C4 + FineWeb document rules, MinHash near-dedup
    "fineweb_rules": {"line_junk": True, "c4_quality": True, "fineweb_quality": True, "minhash": True},
    # rules + dedup + the quality classifier (keep documents it scores P(good) >= 0.5)
    "rules_dedup_quality": {"quality_model": QUALITY_REF, "quality_threshold": 0.5},
}
# A proxy model small enough that three variants train in a few minutes on a laptop CPU.
DEFAULT_PRETRAIN: dict[str, Any] = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                                    "seq_len": 128, "batch_size": 8, "max_steps": 200, "lr": 3e-3,
                                    "warmup_steps": 20, "eval_every": 100, "checkpoint_every": 200,
                                    "tensorboard": False}


class QualityConfig(BaseModel):
    """The quality classifier a variant can use (``quality_model: "@quality"``)."""

    model_config = ConfigDict(extra="forbid")
    good: list[str] = Field(default_factory=lambda: ["data/demo/books"],
                            description="Good reference text: files, folders or globs.")
    bad: list[str] = Field(default_factory=lambda: ["data/demo/html", "data/demo/warc"],
                           description="Raw web text to tell apart from it.")
    seed: int = 0


class Config(StageConfig):
    """Run data-pipeline variants through tokenizer → proxy pretraining → eval and compare them."""

    inputs: list[str] = Field(default_factory=lambda: ["data/demo"], description="The raw corpus every variant reads.")
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: dict(DEFAULT_VARIANTS),
                                                description="Variant name → data-stage config overrides (YAML).")
    data: dict[str, Any] = Field(default_factory=dict, description="Data-stage settings shared by every variant.")
    tokenizer: dict[str, Any] = Field(default_factory=lambda: {"vocab_size": 2048},
                                      description="Tokenizer-stage settings (same for every variant).")
    pretrain: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_PRETRAIN),
                                     description="Proxy model + token budget (same for every variant).")
    tasks: list[str] = Field(default_factory=lambda: ["tasks/core"], description="Shared held-out tasks.")
    task_limit: int | None = Field(None, ge=1, description="Score at most this many items per task.")
    quality: QualityConfig = Field(default_factory=QualityConfig,
                                   description="Quality classifier for variants that set quality_model: '@quality'.")

    @field_validator("variants")
    @classmethod
    def _some(cls, v: dict) -> dict:
        if not v:
            raise ValueError("give at least one variant")
        if QUALITY_DIR in v:
            raise ValueError(f"{QUALITY_DIR!r} is the quality classifier's folder; name the variant differently")
        return v


def _configs(config: Config, name: str, root: Path) -> tuple[Any, Any, Any, Any]:
    """The four stage configs of one variant; errors name the variant and the key."""
    where = f"ablation variant {name!r}"
    overrides = {**config.data, **config.variants[name]}
    if overrides.get("quality_model") == QUALITY_REF:
        overrides["quality_model"] = str(root.parent / QUALITY_DIR)
    d = validate(data_stage.Config, {"inputs": config.inputs, **overrides}, where, "data.")
    t = validate(tokenizer_stage.Config, {**config.tokenizer, "data": [str(root / "data")]}, where, "tokenizer.")
    p = validate(pretrain_stage.Config, {**config.pretrain, "tokenizer": str(root / "tokenizer")}, where, "pretrain.")
    e = validate(eval_stage.Config, {"model": str(root / "pretrain"), "tasks": config.tasks,
                                     "task_limit": config.task_limit, "prompts": []}, where, "eval.")
    return d, t, p, e


def _texts(specs: list[str]) -> list[str]:
    """The extracted text of every document in files / folders / globs (HTML and WARC pages through the extractor)."""
    from lmforge.data.readers import ReadLog, read_file
    from lmforge.data.steps import HtmlExtract

    files = data_stage.collect_inputs(specs)[0]
    docs = [d for f in files for d in read_file(f, ReadLog(quiet=True))]
    return [d.text for d in HtmlExtract()(docs) if not d.dropped]


def train_quality_classifier(config: QualityConfig, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    """Train the quality classifier once into ``out_dir`` (skipped when its inputs and settings are unchanged)."""
    from lmforge.data.quality import train_quality

    inputs = {f"good{i}": s for i, s in enumerate(config.good)} | {f"bad{i}": s for i, s in enumerate(config.bad)}
    stage_run = begin("quality", "1", out_dir, config.model_dump(), inputs=inputs, force=force)
    if stage_run is None:
        return finished(out_dir)
    with stage_run:
        stage_run.metrics.update(train_quality(_texts(config.good), _texts(config.bad), out_dir, seed=config.seed))
    return finished(out_dir)


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> dict[str, Any]:
    out = Path(out_dir)
    rows = []
    quality: Manifest | None = None
    if any(v.get("quality_model") == QUALITY_REF for v in ({**config.data, **o} for o in config.variants.values())):
        quality = train_quality_classifier(config.quality, out / QUALITY_DIR, force=force)
    for name in config.variants:
        root = out / name
        d, t, p, e = _configs(config, name, root)
        console.print(f"[bold]ablation variant {name}[/]")
        manifests = {}
        if quality is not None and d.quality_model == str(out / QUALITY_DIR):
            manifests["quality"] = quality
        with overwrite_allowed():  # like a recipe: a variant whose data changed re-trains its proxy model in place
            manifests["data"] = data_stage.run(d, root / "data", force=force)
            manifests["tokenizer"] = tokenizer_stage.run(t, root / "tokenizer", force=force)
            manifests["pretrain"] = pretrain_stage.run(p, root / "pretrain", force=force)
            manifests["eval"] = eval_stage.run(e, root / "eval", force=force)
        results = json.loads((root / "eval" / "results.json").read_text())
        dm = manifests["data"].metrics
        rows.append({"variant": name, "overrides": config.variants[name],
                     "docs_kept": dm.get("docs_kept"), "docs_in": dm.get("docs_in"),
                     "train_tokens": manifests["tokenizer"].metrics.get("train_tokens"),
                     "tokens_trained": manifests["pretrain"].metrics.get("tokens_trained"),
                     "final_val_loss": manifests["pretrain"].metrics.get("final_val_loss"),
                     "seconds": {s: m.duration_s for s, m in manifests.items()},
                     "tasks": {k: {f: v[f] for f in ("metric", "score", "ci", "n")} for k, v in results["tasks"].items()},
                     "aggregate_centered": results.get("aggregate_centered"),
                     "per_item": {k: _per_item(v["metric"], root / "eval" / "items" / f"{k}.jsonl")
                                  for k, v in results["tasks"].items()}})
    _add_differences(rows)
    report = {"inputs": config.inputs, "pretrain": config.pretrain, "tasks": config.tasks, "variants": rows,
              "quality_classifier": None if quality is None else quality.metrics}
    write_json(out / "ablation.json", report)
    write_text(out / "ablation.md", to_markdown(rows))
    plot(rows, out / "ablation.png")
    console.print(to_markdown(rows))
    return report


def _per_item(metric: str, items_jsonl: Path) -> tuple[list[float], list[float]]:
    """``(numerators, denominators)`` of a task's score over its items (the eval stage's ``items/<task>.jsonl``):
    bits and bytes for bpb, the per-item score and 1 otherwise."""
    items = [json.loads(line) for line in items_jsonl.read_text().splitlines() if line.strip()]
    if metric == "bpb":
        return [i["nll_nats"] / math.log(2) for i in items], [float(i["bytes"]) for i in items]
    return [float(i[metric]) for i in items], [1.0] * len(items)


def _add_differences(rows: list[dict[str, Any]]) -> None:
    """Each variant's score minus the first variant's, with a paired bootstrap CI over the same items."""
    base = rows[0]
    for r in rows:
        for task, s in r["tasks"].items():
            b = base["per_item"].get(task)
            a = r["per_item"][task]
            if b is None or len(b[0]) != len(a[0]):
                continue
            s["diff"] = s["score"] - base["tasks"][task]["score"]
            s["diff_ci"] = list(M.paired_bootstrap_diff_ci(b[0], b[1], a[0], a[1]))
    for r in rows:
        del r["per_item"]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    tasks = sorted({t for r in rows for t in r["tasks"]})
    metric = {t: next(r["tasks"][t]["metric"] for r in rows if t in r["tasks"]) for t in tasks}
    first = rows[0]["variant"] if rows else ""
    header = (["variant", "docs kept", "train tokens"]
              + [h for t in tasks for h in (f"{t} ({metric[t]}, 95% CI)", f"Δ vs {first} (paired 95% CI)")]
              + ["aggregate", "quality s", "data s", "tokenizer s", "pretrain s", "eval s"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["variant"], f"{r['docs_kept']}/{r['docs_in']}", f"{r['train_tokens']:,}"]
        for t in tasks:
            s = r["tasks"].get(t)
            cells.append("-" if s is None else f"{s['score']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]")
            d = None if s is None else s.get("diff")
            cells.append("-" if d is None or r is rows[0] else
                         f"{d:+.3f} [{s['diff_ci'][0]:+.3f}, {s['diff_ci'][1]:+.3f}]")
        agg = r["aggregate_centered"]
        cells.append("-" if agg is None else f"{agg:.3f}")
        cells += [f"{r['seconds'].get(s) or 0:.1f}" for s in ("quality", "data", "tokenizer", "pretrain", "eval")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per task: each variant's score with its 95% CI as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in rows for t in r["tasks"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False)
    names = [r["variant"] for r in rows]
    for ax, t in zip(axes[0], tasks):
        scores = [r["tasks"][t]["score"] for r in rows]
        lo = [r["tasks"][t]["score"] - r["tasks"][t]["ci"][0] for r in rows]
        hi = [r["tasks"][t]["ci"][1] - r["tasks"][t]["score"] for r in rows]
        ax.errorbar(range(len(rows)), scores, yerr=[lo, hi], fmt="o", capsize=4)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{t}\n({rows[0]['tasks'][t]['metric']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)

