"""Knowledge-base question answering (RAG): ingest a folder of documents, chunk, embed, index (faiss + BM25), retrieve
with reciprocal-rank fusion, answer with numbered citations, and measure retrieval and answer quality offline.

Modules: ``ingest`` (files → documents, skip reasons), ``chunking`` (structure-aware chunks with offsets), ``embed``
(MiniLM default, OpenAI-compatible endpoints), ``index`` (the persisted ``KnowledgeBase``), ``stage`` (the
``rag_index`` stage), ``answer`` (grounded answers with citations), ``evaluate`` (recall@k, MRR, nDCG, EM/F1,
faithfulness), ``http`` (a FastAPI router for ``/v1/rag/query``).
"""
