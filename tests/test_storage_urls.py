"""Which config values lmforge.storage treats as object storage (copied in before a stage runs): bucket URLs only —
an endpoint (synth's base_url), a crawl seed, a Ray address or a local path stays what it is."""

from __future__ import annotations

from lmforge.align.synth import Config as SynthConfig
from lmforge.storage import is_url, localize, redact


def test_storage_urls_and_the_rest():
    for url in ("s3://bucket/raw/", "gs://bucket/x.jsonl", "hf://datasets/org/name", "az://container/path"):
        assert is_url(url), url
    for value in ("http://127.0.0.1:8000/v1", "https://example.org/", "ray://head:10001", "file:///tmp/x", "/tmp/x",
                  "auto", "", None, 3):
        assert not is_url(value), value


def test_localize_leaves_an_endpoint_alone():
    cfg = SynthConfig(base_url="http://127.0.0.1:9/v1", model="m", seeds="seeds.jsonl")
    assert localize(cfg) is cfg


def test_redact_drops_credentials():
    assert redact("s3://key:secret@bucket/x") == "s3://bucket/x"
    assert redact("s3://bucket/x") == "s3://bucket/x"


def test_localize_reaches_urls_inside_a_data_pipeline_list(monkeypatch):
    """A quality model given as a bucket URL inside a pipeline entry is copied in like the flat quality_model."""
    import lmforge.storage as storage
    from lmforge.data.stage import Config as DataConfig

    monkeypatch.setattr(storage, "local_copy", lambda url: f"/cache/{url.split('://')[1]}")
    cfg = DataConfig(inputs=["s3://b/raw/"], pipeline=[{"step": "html_extract"},
                                                      {"step": "quality", "model": "s3://b/models/q", "threshold": 0.5}])
    local = localize(cfg)
    assert local.inputs == ["/cache/b/raw/"]
    assert local.pipeline[1]["model"] == "/cache/b/models/q" and local.pipeline[1]["threshold"] == 0.5
    assert cfg.pipeline[1]["model"] == "s3://b/models/q"  # the original config is untouched
