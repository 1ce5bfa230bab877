"""Stages read and write s3:// URLs, tested against a local S3 endpoint (moto's server on loopback, started and
stopped here): raw inputs from a bucket, a data artifact published to a bucket with its manifest last, a later stage
reading that artifact by URL with lineage by URL, no credentials in manifests, an unchanged re-run that touches
nothing, and clear errors for a missing bucket."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from test_data import DEMO



def _docs(data: bytes) -> list[dict]:
    with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as r:
        return [json.loads(line) for line in r.read().decode().splitlines()]

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

ROOT = Path(__file__).resolve().parents[1]
SECRET = "not-a-real-secret-7f3a"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "LMFORGE_CACHE": str(tmp_path_factory.mktemp("cache")), "LMFORGE_HOME": str(tmp_path_factory.mktemp("home")),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key=SECRET, region_name="us-east-1")
    client.create_bucket(Bucket="raw")
    client.create_bucket(Bucket="corpora")
    for f in sorted((DEMO / "jsonl").iterdir()) + sorted((DEMO / "books").glob("kjv-*.txt")):
        client.upload_file(str(f), "raw", f"demo/{f.parent.name}/{f.name}")
    try:
        yield client, env
    finally:
        server.stop()


def _lmforge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _keys(client, bucket: str, prefix: str) -> dict[str, str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}


def test_data_run_from_bucket_to_bucket_then_tokenizer_by_url(s3, tmp_path):
    client, env = s3
    r = _lmforge(env, "data", "run", "--inputs", "s3://raw/demo/", "--out", "s3://corpora/demo", "--shards", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    keys = _keys(client, "corpora", "demo/")
    assert "demo/manifest.json" in keys and any(k.startswith("demo/docs/part-") for k in keys)
    assert not any(".tmp-" in k for k in keys)
    manifest_text = client.get_object(Bucket="corpora", Key="demo/manifest.json")["Body"].read().decode()
    manifest = json.loads(manifest_text)
    assert manifest["status"] == "done"
    assert manifest["inputs"]["raw0"]["path"] == "s3://raw/demo/" and manifest["config"]["inputs"] == ["s3://raw/demo/"]
    assert SECRET not in manifest_text and "testing" not in manifest_text and str(env["LMFORGE_CACHE"]) not in manifest_text

    # the same files read locally give the same kept documents
    local_in = tmp_path / "raw"
    for key in _keys(client, "raw", "demo/"):
        (local_in / key).parent.mkdir(parents=True, exist_ok=True)
        client.download_file("raw", key, str(local_in / key))
    r = _lmforge(env, "data", "run", "--inputs", str(local_in / "demo"), "--out", str(tmp_path / "local"),
                 "--shards", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    for f in sorted((tmp_path / "local" / "docs").iterdir()):
        remote = _docs(client.get_object(Bucket="corpora", Key=f"demo/docs/{f.name}")["Body"].read())
        local = _docs(f.read_bytes())
        assert len(remote) == len(local) > 0
        for a, b in zip(remote, local):  # the same documents; the remote ones name the bucket as their source
            assert a["meta"].pop("source").startswith("s3://raw/demo/")
            assert b["meta"].pop("source").startswith(str(local_in / "demo"))
            assert (a["text"], a["meta"]) == (b["text"], b["meta"])
            assert a["id"].replace("s3://raw/demo", str(local_in / "demo")) == b["id"]

    # an unchanged re-run is skipped and leaves the bucket as it was
    again = _lmforge(env, "data", "run", "--inputs", "s3://raw/demo/", "--out", "s3://corpora/demo", "--shards", "2")
    assert again.returncode == 0 and "up to date" in again.stdout + again.stderr
    assert _keys(client, "corpora", "demo/") == keys

    # a later stage reads the artifact by URL; its lineage names the URL and the data run
    tok = _lmforge(env, "tokenizer", "train", "--data", "s3://corpora/demo", "--out", str(tmp_path / "tok"),
                   "--vocab-size", "512")
    assert tok.returncode == 0, tok.stderr[-3000:]
    tmanifest = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    ref = next(v for v in tmanifest["inputs"].values() if v["path"] == "s3://corpora/demo")
    assert ref["fingerprint"] == f"run:{manifest['run_id']}"


def test_missing_bucket_is_a_clear_error(s3, tmp_path):
    _, env = s3
    r = _lmforge(env, "data", "run", "--inputs", "s3://no-such-bucket/raw/", "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "s3://no-such-bucket/raw/: not found" in r.stderr + r.stdout
    r = _lmforge(env, "data", "run", "--inputs", str(DEMO / "jsonl"), "--out", "s3://no-such-bucket/corpus")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "s3://no-such-bucket/corpus" in r.stderr + r.stdout
