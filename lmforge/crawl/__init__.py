"""The crawl stage: polite, resumable web crawling into WARC files (see :mod:`lmforge.crawl.stage`)."""
