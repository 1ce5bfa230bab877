"""Data ablation end to end on a tiny real corpus: variants → data → tokenizer → proxy pretrain → eval → table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import ConfigError
from lmforge.data.io import iter_documents
from lmforge.eval import ablate

ROOT = Path(__file__).resolve().parent.parent


def tiny(tmp_path) -> ablate.Config:
    return ablate.Config(
        inputs=[str(ROOT / "data/demo/books/kjv-ruth.txt"), str(ROOT / "data/demo/books/kjv-jonah.txt"),
                str(ROOT / "data/demo/html/library/copy.html"), str(ROOT / "data/demo/html/mirror/copy-module.html"),
                str(ROOT / "data/demo/html/genindex-J.html")],
        variants={"no_filters": {"gopher_repetition": False, "gopher_quality": False, "dedup": False},
                  "rules_dedup": {},
                  "quality": {"gopher_repetition": False, "gopher_quality": False, "dedup": False,
                              "quality_model": "@quality", "quality_threshold": 0.5}},
        quality={"good": [str(ROOT / "data/demo/books/kjv-ruth.txt"), str(ROOT / "data/demo/books/kjv-jonah.txt")],
                 "bad": [str(ROOT / "data/demo/html/genindex.html"), str(ROOT / "data/demo/html/library")]},
        data={"shards": 1, "txt_chunk_chars": 2000},
        tokenizer={"vocab_size": 300},
        pretrain={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "seq_len": 32,
                  "batch_size": 4, "max_steps": 3, "warmup_steps": 1, "eval_every": 3, "eval_windows": 1,
                  "checkpoint_every": 3, "tensorboard": False},
        tasks=[str(ROOT / "tasks/core/minimal_pairs.yaml"), str(ROOT / "tasks/core/heldout_shakespeare_bpb.yaml")],
        task_limit=4,
    )


def test_ablation_end_to_end_and_cached(tmp_path):
    cfg = tiny(tmp_path)
    report = ablate.run(cfg, tmp_path / "abl")
    rows = {r["variant"]: r for r in report["variants"]}
    assert set(rows) == {"no_filters", "rules_dedup", "quality"}
    # the filters and dedup drop documents (copy-module.html duplicates copy.html; an index page fails the rules); no filters keeps everything
    assert rows["no_filters"]["docs_kept"] == rows["no_filters"]["docs_in"]
    assert rows["rules_dedup"]["docs_kept"] < rows["no_filters"]["docs_kept"]
    # the classifier (Bible text = good, Python doc pages = bad) keeps only Bible chunks, all scored >= 0.5
    q = json.loads((tmp_path / "abl" / "quality_classifier" / "manifest.json").read_text())
    assert q["status"] == "done" and q["metrics"]["auc"] > 0.9
    assert report["quality_classifier"]["auc"] == q["metrics"]["auc"]
    assert rows["quality"]["seconds"]["quality"] > 0 and "quality" not in rows["rules_dedup"]["seconds"]
    kept = {d["id"]: d["meta"]["quality"] for d in iter_documents(tmp_path / "abl" / "quality" / "data")}
    assert kept and all("kjv-" in k for k in kept) and min(kept.values()) >= 0.5
    # same proxy model, same token budget
    assert rows["no_filters"]["tokens_trained"] == rows["rules_dedup"]["tokens_trained"] == 3 * 4 * 32
    for r in rows.values():
        assert set(r["tasks"]) == {"minimal_pairs", "heldout_shakespeare_bpb"}
        bpb = r["tasks"]["heldout_shakespeare_bpb"]
        assert bpb["ci"][0] <= bpb["score"] <= bpb["ci"][1]
        assert {"data", "tokenizer", "pretrain", "eval"} <= set(r["seconds"])
        # differences to the first variant, with a paired CI that contains the difference
        d = r["tasks"]["minimal_pairs"]
        assert d["diff_ci"][0] <= d["diff"] <= d["diff_ci"][1]
    assert rows["no_filters"]["tasks"]["heldout_shakespeare_bpb"]["diff"] == 0.0
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert md.count("\n") == 5 and "heldout_shakespeare_bpb (bpb, 95% CI)" in md and "Δ vs no_filters" in md
    assert (tmp_path / "abl" / "ablation.png").stat().st_size > 0
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["variants"][0]["variant"] == "no_filters"
    # cached: nothing re-runs, so every stage keeps its run id
    ids = {v: json.loads((tmp_path / "abl" / v / "pretrain" / "manifest.json").read_text())["run_id"] for v in rows}
    ablate.run(cfg, tmp_path / "abl")
    assert ids == {v: json.loads((tmp_path / "abl" / v / "pretrain" / "manifest.json").read_text())["run_id"]
                   for v in rows}
    # a changed variant re-runs its own chain, retraining its proxy model in place (as a recipe does)
    cfg.variants = {"rules_dedup": {"min_words": 20}}
    ablate.run(cfg, tmp_path / "abl")
    assert json.loads((tmp_path / "abl" / "rules_dedup" / "pretrain" / "manifest.json").read_text())["run_id"] \
        != ids["rules_dedup"]


def test_bad_variant_key_names_the_variant(tmp_path):
    cfg = tiny(tmp_path)
    cfg.variants = {"typo": {"dedupe": False}}
    with pytest.raises(ConfigError, match="ablation variant 'typo': data.dedupe: unknown key"):
        ablate.run(cfg, tmp_path / "abl")
