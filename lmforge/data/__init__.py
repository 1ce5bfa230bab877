"""The data stage: raw files (WARC, HTML, JSONL, text) → filtered, deduplicated ``{id, text, meta}`` JSONL.zst shards.

Modules: ``documents`` (the Document record), ``io`` (shard reading/writing; ``iter_documents`` for later stages),
``readers`` (one reader per input format), ``steps`` / ``filters`` (the pipeline steps), ``executor`` (shards,
workers, resume, stats), ``report`` (report.html) and ``stage`` (``Config`` and ``run``).  Nothing heavy is imported
here.
"""
