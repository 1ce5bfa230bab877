"""A small real workspace for the dashboard tests: raw JSONL → data run → tokenizer → tiny pretrain, all recorded in
one registry ($LMFORGE_HOME) so pages, lineage and curves have real runs to show."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pydoc_data.topics


def tiny_pretrain_config(tok: Path, **kw):
    from lmforge.train import pretrain

    base = dict(tokenizer=str(tok), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seq_len=32,
                batch_size=4, max_steps=8, warmup_steps=2, eval_every=4, eval_windows=2, checkpoint_every=4, lr=1e-2,
                tensorboard=False)
    base.update(kw)
    return pretrain.Config(**base)


def build_workspace(root: Path) -> dict[str, Path]:
    """Runs the stages with ``root/home`` as the registry; returns the folders."""
    from lmforge.data import stage as data_stage
    from lmforge.tokenizer import stage as tok_stage
    from lmforge.train import pretrain

    raw = root / "raw" / "docs.jsonl"
    raw.parent.mkdir(parents=True)
    with open(raw, "w") as f:
        for key, text in sorted(pydoc_data.topics.topics.items()):
            f.write(json.dumps({"id": key, "text": text}) + "\n")
        f.write(json.dumps({"id": "tiny-doc", "text": "too short"}) + "\n")
    old = os.environ.get("LMFORGE_HOME")
    os.environ["LMFORGE_HOME"] = str(root / "home")
    try:
        data = root / "runs" / "data"
        data_stage.run(data_stage.Config(inputs=[str(raw)], shards=1, langid=False, min_stop_words=0), data)
        tok = root / "runs" / "tok"
        tok_stage.run(tok_stage.Config(data=str(data), vocab_size=400, val_fraction=0.1), tok)
        model = root / "runs" / "model"
        pretrain.run(tiny_pretrain_config(tok), model)
    finally:
        if old is None:
            os.environ.pop("LMFORGE_HOME", None)
        else:
            os.environ["LMFORGE_HOME"] = old
    return {"home": root / "home", "raw": raw, "data": data, "tok": tok, "model": model}


def shared_workspace(tmp_path_factory) -> dict[str, Path]:
    """One workspace per test session, shared by the dashboard test modules (read-only for them)."""

    root = tmp_path_factory.getbasetemp() / "dashboard-ws"
    marker = root / "built"
    if not marker.exists():
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        build_workspace(root)
        marker.write_text("ok")
    return {"home": root / "home", "raw": root / "raw" / "docs.jsonl", "data": root / "runs" / "data",
            "tok": root / "runs" / "tok", "model": root / "runs" / "model"}
