"""Parquet input and output, `data inspect` helpers and report re-rendering."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.io import iter_documents
from lmforge.data.peek import field_counts, format_peek, get_field, peek, render_report
from lmforge.data.readers import ReadLog, read_file
from lmforge.data.stage import Config, run

from test_data import DAODEJING, check_conservation, hamlet_scene


def test_parquet_reader_rows_meta_and_errors(tmp_path):
    ham = hamlet_scene()
    table = pa.table({"id": ["a", None, "c"], "text": [ham[:2000], ham[2000:4000], None],
                      "url": ["http://x.org/a", "http://x.org/b", None], "year": [1600, 1601, 1602]})
    pq.write_table(table, tmp_path / "t.parquet")
    log = ReadLog(quiet=True)
    docs = list(read_file(tmp_path / "t.parquet", log))
    assert [d.id for d in docs] == ["a", f"{tmp_path / 't.parquet'}:1"]
    assert docs[0].meta["url"] == "http://x.org/a" and docs[0].meta["year"] == 1600 and docs[1].meta["row"] == 1
    assert log.errors == {"read_error:missing_text": 1}  # row 2 has no text: counted, not fatal
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "notext.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    log = ReadLog(quiet=True)
    assert list(read_file(tmp_path / "notext.parquet", log)) == [] and list(read_file(tmp_path / "bad.parquet", log)) == []
    assert log.errors == {"read_error:missing_text": 1, "read_error:bad_parquet": 1}


def _run(tmp_path, **kw):
    src = tmp_path / "in"
    src.mkdir()
    ham = hamlet_scene()
    with open(src / "d.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": f"en{i}", "text": ham[i * 1500 : (i + 1) * 1500]}) + "\n")
        f.write(json.dumps({"id": "zh", "text": DAODEJING}) + "\n")
        f.write(json.dumps({"id": "short", "text": "Too short."}) + "\n")
    out = tmp_path / "out"
    run(Config(inputs=[str(src)], shards=2, **kw), out)
    return out


def test_parquet_output_round_trip_and_inspect(tmp_path):
    out = _run(tmp_path, output_format="parquet", min_stop_words=0)
    assert sorted(p.name for p in (out / "docs").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    check_conservation(out)
    docs = list(iter_documents(out))  # later stages read Parquet shards the same way
    assert {d["id"] for d in docs} >= {"en0", "zh"} and "short" not in {d["id"] for d in docs}
    assert all(isinstance(d["meta"], dict) and "lang" in d["meta"] for d in docs)
    # the Parquet output is itself a valid input
    log = ReadLog(quiet=True)
    again = list(read_file(out / "docs" / "part-00000.parquet", log))
    assert again and not log.errors and again[0].meta["lang"] in ("en", "zh")

    two = peek(out, n=2)
    assert len(two) == 2 and all("meta" in r for r in two)
    langs = field_counts(out, "meta.lang")
    assert langs["zh"] == 1 and sum(langs.values()) == len(docs)
    dropped = peek(out, n=10, dropped=True)
    assert "short" in {r["id"] for r in dropped}
    assert field_counts(out, "meta.drop_reason", dropped=True)["too_few_words"] >= 1
    text = format_peek(dropped[:1], field="meta.drop_reason")
    assert dropped[0]["id"] in text and "meta.drop_reason" in text
    assert get_field({"meta": {"scores": {"words": 3}}}, "meta.scores.words") == 3
    assert get_field({"meta": {}}, "meta.lang") == "<missing>"
    with pytest.raises(FileNotFoundError, match="no shards"):
        peek(tmp_path / "in", 1)


def test_report_is_rerendered_from_stats(tmp_path):
    out = _run(tmp_path)
    (out / "report.html").unlink()
    path = render_report(out)
    html = path.read_text()
    assert path == out / "report.html" and "gopher_quality_v2" in html and "too_few_words" in html
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="stats.json"):
        render_report(tmp_path / "empty")
