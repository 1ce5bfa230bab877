"""The eval stage with tasks, the leaderboard, and agreement with lm-evaluation-harness on the same model folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics

from lmforge.eval import leaderboard
from lmforge.eval import stage as eval_stage
from lmforge.eval.harness import LM, run_task
from lmforge.eval.tasks import find_tasks, load_task
from lmforge.model.hf import save_model
from lmforge.model.llama import Llama, LlamaConfig
from lmforge.tokenizer.bpe import train_bpe

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "tasks" / "core"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-init Llama (weights scaled up so choices get distinct scores) + a BPE trained on real text."""
    folder = tmp_path_factory.mktemp("model")
    tok = train_bpe(list(topics.values()), 800, folder)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    model = Llama(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20)
    save_model(model, folder)
    return folder


def test_shipped_suite_is_valid():
    names = {load_task(p).name: load_task(p) for p in find_tasks([SUITE, ROOT / "tasks" / "chat"])}
    assert set(names) == {"cloze_shakespeare", "minimal_pairs", "chatterbot_mc", "heldout_shakespeare_bpb",
                          "chatterbot_qa"}
    assert len(names["minimal_pairs"].items) == 50
    # the held-out plays really are absent from the demo corpus
    demo = " ".join(p.name for p in (ROOT / "data" / "demo" / "books").iterdir())
    for play in ("coriolanus", "cymbeline", "henry-v", "measure"):
        assert play not in demo
    for item in names["minimal_pairs"].items:  # grammatical and ungrammatical sentences differ
        assert item["choices"][0] != item["choices"][1]


def test_eval_stage_with_tasks_writes_results_and_registry(model_dir, tmp_path):
    cfg = eval_stage.Config(model=str(model_dir), tasks=[str(SUITE)], task_limit=8, prompts=["The for statement"],
                            max_new_tokens=4)
    m = eval_stage.run(cfg, tmp_path / "eval")
    assert m.status == "done"
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(res["tasks"]) == {"cloze_shakespeare", "minimal_pairs", "chatterbot_mc", "heldout_shakespeare_bpb"}
    for r in res["tasks"].values():
        assert r["n"] == 8 and r["ci"][0] <= r["score"] <= r["ci"][1]
    assert res["tasks"]["heldout_shakespeare_bpb"]["score"] > 1.0  # an untrained model is bad at Shakespeare
    mc = [r for r in res["tasks"].values() if "centered" in r]
    assert res["aggregate_centered"] == pytest.approx(sum(r["centered"] for r in mc) / len(mc), abs=1e-5)
    assert m.metrics["minimal_pairs.acc"] == pytest.approx(res["tasks"]["minimal_pairs"]["score"], abs=1e-5)
    assert len((tmp_path / "eval" / "items" / "cloze_shakespeare.jsonl").read_text().splitlines()) == 8
    assert "| minimal_pairs | acc |" in (tmp_path / "eval" / "results.md").read_text()
    # unchanged: skipped
    assert eval_stage.run(cfg, tmp_path / "eval").run_id == m.run_id
    # leaderboard row from the registry
    rows = leaderboard.collect()
    assert len(rows) == 1 and rows[0].path == str(model_dir.resolve())
    assert rows[0].params == LlamaConfig(**{k: v for k, v in json.loads((model_dir / "config.json").read_text()).items()
                                            if k in LlamaConfig.__dataclass_fields__}).num_params()
    md = leaderboard.to_markdown(rows)
    assert "minimal_pairs (acc)" in md.splitlines()[0] and sum(l.startswith("|") for l in md.splitlines()) == 3
    assert "<table>" in leaderboard.to_html(rows)


def test_eval_needs_data_or_tasks(model_dir, tmp_path):
    from lmforge.config import ConfigError
    with pytest.raises(ConfigError, match="give `data`"):
        eval_stage.run(eval_stage.Config(model=str(model_dir)), tmp_path / "e")


def test_lm_eval_agrees_with_lmforge(model_dir, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lmforge.eval.lmeval import export_task

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    lm = LM.from_folder(model_dir)
    ours, names = {}, []
    for name, limit, shots in (("cloze_shakespeare", 24, 0), ("minimal_pairs", 30, 0), ("minimal_pairs", 20, 2)):
        task = load_task(SUITE / f"{name}.yaml")
        task.items = task.items[:limit]
        task.spec.num_fewshot, task.spec.fewshot_sampler = shots, "lm_eval"  # 2-shot: lm-eval's sampler, replayed
        key = f"lmforge_{name}_{shots}shot"
        ours[key] = run_task(lm, task)
        export_task(task, tmp_path / "lmeval_tasks", name=key)
        names.append(key)
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=names,
                                  task_manager=TaskManager(include_path=str(tmp_path / "lmeval_tasks")),
                                  device="cpu", batch_size=8, log_samples=True)
    for name in names:
        theirs = out["results"][name]
        n = len(out["samples"][name])
        assert n == ours[name]["n"]
        assert theirs["acc,none"] == pytest.approx(ours[name]["acc"], abs=1e-9)
        assert theirs["acc_norm,none"] == pytest.approx(ours[name]["acc_norm"], abs=1e-9)
        # and the same log-likelihoods, item by item
        by_doc = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        for s, rec in zip(by_doc, ours[name]["items"]):
            lls = [float(r[0][0]) for r in s["resps"]]
            assert lls == pytest.approx(rec["loglikelihoods"], abs=2e-3)
    assert os.environ["HF_HUB_OFFLINE"] == "1"



def test_fewshot_prompts_match_lm_eval(tmp_path, monkeypatch):
    """Few-shot contexts are the same strings lm-eval builds from the exported task (its samplers, replayed)."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lmforge.eval.harness import _context
    from lmforge.eval.lmeval import export_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    tasks = {}
    for sampler in ("lm_eval", "first_n"):
        task = load_task(SUITE / "cloze_shakespeare.yaml")
        task.spec.num_fewshot, task.spec.fewshot_sampler = 3, sampler
        task.items = task.items[:15] + [task.items[0]]  # a duplicate item: never its own example, in both tools
        export_task(task, tmp_path / "lmeval_tasks", name=f"cloze_{sampler}")
        tasks[f"cloze_{sampler}"] = task
    loaded = TaskManager(include_path=str(tmp_path / "lmeval_tasks")).load(list(tasks))["tasks"]
    for name, task in tasks.items():
        theirs = loaded[name]
        theirs.set_fewshot_seed(task.spec.fewshot_seed)
        docs = list(theirs.test_docs())
        assert len(docs) == len(task.items)
        for i, doc in enumerate(docs):
            ctx = _context(None, task, i)
            assert theirs.fewshot_context(doc, 3) == ctx
            assert task.render(task.items[i]) not in ctx[:-len(task.render(task.items[i]))]
        assert task.fewshot(0) != task.fewshot(1)
    # our own default sampler picks other examples, so this agreement is not a given
    task = tasks["cloze_lm_eval"]
    task.spec.fewshot_sampler = "per_item"
    theirs = loaded["cloze_lm_eval"]
    assert _context(None, task, 1) != theirs.fewshot_context(list(theirs.test_docs())[1], 3)
