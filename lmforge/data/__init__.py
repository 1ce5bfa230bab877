"""The data stage: raw files (WARC, HTML, JSONL, Parquet, text) → filtered, deduplicated ``{id, text, meta}`` shards.

Modules: ``documents`` (the Document record), ``io`` (shard reading/writing; ``iter_documents`` for later stages),
``readers`` (one reader per input format), ``steps`` / ``filters`` (the pipeline steps; ``wordsplit`` counts words
as datatrove's spaCy tokenizer does), ``mixing`` (domain tags, top-fraction selection, target mixtures), ``executor``
(shards, workers, resume, stats), ``report`` (report.html), ``peek`` (inspect shards, re-render the report) and
``stage`` (``Config`` and ``run``).  Nothing heavy is imported here.
"""
