"""Knowledge-base question answering (RAG): ingest a folder of documents, chunk, embed, index (faiss + BM25), retrieve
with reciprocal-rank fusion, answer with numbered citations, and measure retrieval and answer quality offline.

Modules: ``ingest`` (files → documents, skip reasons), ``chunking`` (structure-aware chunks with offsets), ``embed``
(MiniLM default, OpenAI-compatible endpoints), ``index`` (the persisted ``KnowledgeBase``), ``stage`` (the
``rag_index`` stage), ``answer`` (grounded answers with citations), ``evaluate`` (recall@k, MRR, nDCG, EM/F1,
faithfulness, model-judged faithfulness), ``judge`` (constrained yes/no judgements: LLM re-ranking, faithfulness),
``http`` (``/v1/rag/query`` and retrieval-augmented ``/v1/chat/completions`` on the lmforge server: ``attach_rag``).
"""
