"""The command line as a user meets it: clear one-line errors, commands that exist and answer."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lmforge(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LMFORGE_HOME=str(home), HF_HUB_OFFLINE="1", COLUMNS="200")
    env.pop("LMFORGE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    proc = lmforge("tokenizer", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "t"),
                   home=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "missing" in proc.stderr and "matches no file" in proc.stderr
    proc = lmforge("pretrain", "--tokenizer", "x", "--lr", "-1", home=tmp_path)
    assert proc.returncode == 2 and "lr" in proc.stderr and "Traceback" not in proc.stderr


def test_train_quality_command(tmp_path):
    proc = lmforge("data", "train-quality", "--good", "data/demo/books", "--bad", "data/demo/html",
                   "--bad", "data/demo/warc", "--out", str(tmp_path / "q"), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["auc"] > report["length_baseline_auc"] and report["auc"] > 0.9


def test_leaderboard_without_runs_says_what_to_do(tmp_path):
    proc = lmforge("leaderboard", home=tmp_path)
    assert proc.returncode == 1 and "lmforge eval" in proc.stderr


def test_data_run_inspect_and_report(tmp_path):
    out = tmp_path / "data"
    assert lmforge("data", "run", "--inputs", "data/demo/html", "--out", str(out), home=tmp_path).returncode == 0
    peek = lmforge("data", "inspect", str(out), "--n", "2", "--field", "meta.lang", home=tmp_path)
    assert peek.returncode == 0 and "meta.lang over" in peek.stdout and "en" in peek.stdout
    dropped = lmforge("data", "inspect", str(out), "--dropped", "--field", "meta.drop_reason", home=tmp_path)
    assert dropped.returncode == 0 and "too_few_words" in dropped.stdout  # the genindex / search link lists
    (out / "report.html").unlink()
    rep = lmforge("data", "report", str(out), home=tmp_path)
    assert rep.returncode == 0 and (out / "report.html").read_text().lower().startswith("<!doctype html")


def tiny_model(folder: Path) -> Path:
    """A random-init tiny Llama with a BPE trained on real text: enough to exercise answering end to end."""
    import pydoc_data.topics

    from lmforge.model import Llama, LlamaConfig
    from lmforge.model.hf import save_model
    from lmforge.tokenizer.bpe import train_bpe

    tok = train_bpe(list(pydoc_data.topics.topics.values()), 400, folder)
    model = Llama(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                              max_position_embeddings=2048))
    model.init_weights(seed=0)
    save_model(model, folder)
    return folder


def test_rag_index_ask_and_eval_through_the_cli(tmp_path):
    docs = tmp_path / "docs"
    (docs / "django/faq").mkdir(parents=True)
    for name in ("general.html", "install.html"):  # same relative paths as the bundled QA set's gold passages
        (docs / "django/faq" / name).write_bytes((ROOT / "data/kb/docs/django/faq" / name).read_bytes())
    index = tmp_path / "kb"
    proc = lmforge("rag", "index", "--docs", str(docs), "--out", str(index), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    no_model = lmforge("rag", "ask", "Who is Django named after?", "--index", str(index), home=tmp_path)
    assert no_model.returncode == 2 and "--model" in no_model.stderr
    model = tiny_model(tmp_path / "model")
    ans = lmforge("rag", "ask", "Who is Django named after?", "--index", str(index), "--model", str(model),
                  home=tmp_path)
    assert ans.returncode == 0, ans.stderr
    off_topic = lmforge("rag", "ask", "What is the boiling point of tungsten?", "--index", str(index),
                        "--model", str(model), "--min-score", "0.5", home=tmp_path)
    assert off_topic.returncode == 0 and "does not contain" in off_topic.stdout
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(line + "\n" for line in (ROOT / "data/kb/qa.jsonl").read_text().splitlines()
                          if '"django/faq/general.html"' in line))
    ev = lmforge("rag", "eval", str(qa), "--index", str(index), home=tmp_path)
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(ev.stdout)
    assert set(metrics) == {"dense", "bm25", "hybrid"} and metrics["hybrid"]["recall@5"] > 0.5
