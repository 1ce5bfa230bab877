"""`lmforge data langs RUN` (language ratios before/after each step, plot) and tokenizer fertility per language."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lmforge.data.io import iter_documents
from lmforge.data.langprofiles import word_count
from lmforge.tokenizer import evaluate

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "multilingual"
pytestmark = pytest.mark.skipif(not (CORPUS / "zh.jsonl").is_file(), reason="data/multilingual is built at install time from Debian packages (make install; bench/build_multilingual_corpus.py)")


def _bpe(texts: list[str], folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def data_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("langs")
    src = tmp / "in"
    src.mkdir()
    for name in ("en", "de", "zh", "mixed"):
        (src / f"{name}.jsonl").write_text((CORPUS / f"{name}.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    (src / "short.jsonl").write_text(json.dumps({"id": "s", "text": "Zu kurz."}) + "\n")  # dropped by a rule
    out = tmp / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "data", "run", "--inputs", str(src), "--shards", "2",
                        "--mixed-langs", "split", "-o", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "added (mixed-language splits)" in r.stdout + r.stderr
    english = [json.loads(line)["text"] for line in (CORPUS / "en.jsonl").open()]
    return out, _bpe(english, tmp / "tok")


def test_data_langs_command_counts_every_document_per_language_and_step(data_run):
    out, tok = data_run
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "data", "langs", str(out), "--tokenizer", str(tok)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    printed = r.stdout + r.stderr
    assert "langs.png" in printed and "│ zh" in printed and "│ de" in printed
    assert (out / "langs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    t = json.loads((out / "langs.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    assert t["steps"] == [s["name"] for s in stats["steps"]]
    # read: every input document once; after the last step: exactly the written documents, per language
    assert t["totals"]["read"]["docs"] == stats["read"]["docs"]
    kept = list(iter_documents(out))
    assert Counter({lang: row["kept"]["docs"] for lang, row in t["langs"].items() if row["kept"]["docs"]}) == \
        Counter(d["meta"]["lang"] for d in kept)
    assert t["totals"]["kept"]["chars"] == sum(len(d["text"]) for d in kept)
    # per step, the documents left equal the step's kept count (split pieces included)
    for k, st in enumerate(stats["steps"]):
        assert sum(row["after"][st["name"]]["docs"] for row in t["langs"].values()) == st["kept"], st["name"]
    # the short German document is counted under de (language ID runs before the rule that drops it)
    assert t["langs"]["de"]["read"]["docs"] > t["langs"]["de"]["kept"]["docs"]
    zh = t["langs"]["zh"]["kept"]
    assert zh["tokens"] > zh["words"] > 0 and zh["chars"] > zh["words"]  # jieba words: fewer than characters
    bad = subprocess.run([sys.executable, "-m", "lmforge.cli", "data", "langs", str(CORPUS)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "no stats.json" in bad.stdout + bad.stderr


def test_tokenizer_fertility_per_language(data_run, tmp_path):
    out, tok = data_run
    res = evaluate.run(evaluate.Config(tokenizer=str(tok), data=[str(out)], split="all", group_by=["lang"],
                                       report_dir=str(tmp_path / "rep")))
    rows = res["groups"]["lang"]
    docs = list(iter_documents(out))
    zh_words = sum(word_count(d["text"], "zh") for d in docs if d["meta"]["lang"] == "zh")
    assert rows["zh"]["words"] == zh_words
    for row in rows.values():
        assert row["tokens_per_word"] == round(row["tokens"] / row["words"], 4)
        assert row["tokens_per_char"] == round(row["tokens"] / row["chars"], 4)
    # an English-trained BPE: more tokens per word for German, far more per character for Chinese
    assert rows["de"]["tokens_per_word"] > rows["en"]["tokens_per_word"]
    assert rows["zh"]["tokens_per_char"] > 2 * rows["en"]["tokens_per_char"]
    md = (tmp_path / "rep" / "compression.md").read_text()
    assert "tokens/word" in md and "| zh |" in md
