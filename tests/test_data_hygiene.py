"""Input hygiene of the data stage: one bad record or file never costs the others, binary files named as text are
dropped, legacy encodings are detected and said, and a run with nothing to read fails before it starts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.data.io import iter_documents
from lmforge.data.readers import ReadLog, read_file
from lmforge.data.textdecode import decode_text, sniff_binary

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "demo"


def paragraphs(n: int) -> list[str]:
    """``n`` distinct real paragraphs (Hamlet), each long enough for the default quality filters."""
    text = (DEMO / "books" / "shakespeare-hamlet.txt").read_text()
    paras = [p for p in text.split("\n\n") if len(p.split()) > 60]
    return paras[:n]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def read(path: Path) -> tuple[list, ReadLog]:
    log = ReadLog(quiet=True)
    return list(read_file(path, log)), log


# -- lone surrogates -----------------------------------------------------------------------------------------------------
def test_lone_surrogate_records_are_dropped_and_the_rest_is_written(tmp_path):
    good = paragraphs(5)
    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps({"id": f"a{i}", "text": t}) for i, t in enumerate(good[:3])]
    lines.insert(1, json.dumps({"id": "escape", "text": "a lone @ surrogate " + good[3]}).replace("@", "\\ud800"))
    lines.insert(2, '{"id": "in-meta", "text": "fine", "meta": {"title": "\\udfff"}}')
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    cesu = b'{"id": "cesu", "text": "CESU-8 \xed\xa0\x80 bytes"}\n'  # U+D800 encoded as if it were a character
    (src / "b.jsonl").write_bytes(cesu + json.dumps({"id": "b1", "text": good[4]}).encode() + b"\n")
    out = tmp_path / "out"
    proc = cli("data", "run", "--inputs", str(src), "--out", str(out), "--shards", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kept = list(iter_documents(out))
    assert sorted(d["id"] for d in kept) == ["a0", "a1", "a2", "b1"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"]["errors"] == {"read_error:invalid_unicode": 3}
    assert stats["totals"]["docs_in"] == stats["totals"]["docs_kept"] + stats["totals"]["docs_dropped"] == 4
    assert "a.jsonl:2" in proc.stderr.replace("\n", "") or "a.jsonl:2" in proc.stdout.replace("\n", "")
    assert "read_error:invalid_unicode" in (out / "report.html").read_text()


def test_parquet_row_with_invalid_utf8_is_dropped_alone(tmp_path):
    texts = pa.array([b"first row", b"bad \xed\xa0\x80 row", b"third row"], pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"text": texts, "id": ["r0", "r1", "r2"]}), tmp_path / "t.parquet")
    docs, log = read(tmp_path / "t.parquet")
    assert [d.id for d in docs] == ["r0", "r2"] and log.errors == {"read_error:not_utf8": 1}


# -- binary files with text names, legacy encodings ----------------------------------------------------------------------
def _random_bytes(n: int, seed: int, nul: bool = True) -> bytes:
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(n))
    return data if nul else data.replace(b"\x00", b"\x01")


def test_binary_files_named_as_text_are_read_errors(tmp_path):
    files = {
        "random.html": _random_bytes(4000, 1),
        "random.txt": _random_bytes(4000, 2),
        "no-nul.txt": _random_bytes(300, 3, nul=False),
        "no-nul.html": _random_bytes(300, 4, nul=False),
        "image.txt": b"\x89PNG\r\n\x1a\n" + b"IHDR" * 50,
        "archive.html": b"PK\x03\x04" + b"word " * 100,
        "doc.txt.gz": __import__("gzip").compress(_random_bytes(2000, 5)),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        docs, log = read(tmp_path / name)
        assert docs == [] and log.errors == {"read_error:binary": 1}, name


def test_text_encodings_are_detected_and_recorded(tmp_path):
    (tmp_path / "w.txt").write_bytes("Café au lait, a naïve résumé “quoted”. Grüße aus München.\n".encode("cp1252") * 5)
    (tmp_path / "u16.txt").write_bytes("UTF-16 text with a BOM: ünïcödé.\n".encode("utf-16") * 5)
    (tmp_path / "ru.txt").write_bytes("Съешь же ещё этих мягких французских булок, да выпей чаю. ".encode("cp1251") * 8)
    docs, log = read(tmp_path / "w.txt")
    assert not log.errors and docs[0].meta["encoding"] == "cp1252" and "naïve résumé “quoted”" in docs[0].text
    docs, log = read(tmp_path / "u16.txt")
    assert not log.errors and docs[0].meta["encoding"] == "utf-16" and "ünïcödé" in docs[0].text
    docs, log = read(tmp_path / "ru.txt")
    assert not log.errors and "французских булок" in docs[0].text
    docs, _ = read(DEMO / "html" / "library" / "copy.html")
    assert docs[0].meta["encoding"] == "utf-8"


def test_sniff_keeps_real_text():
    for path in [*(DEMO / "books").glob("*.txt"), *(DEMO / "html").rglob("*.html")]:
        assert sniff_binary(path.read_bytes()) is None, path
    assert decode_text("plain ascii".encode())[1] == "utf-8"
    assert decode_text(b"\x1b[31mred\x1b[0m log line\n")[1] == "utf-8"  # ANSI colours are text


# -- nothing to read -----------------------------------------------------------------------------------------------------
def test_nothing_to_read_fails_early_saying_what_was_found(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for name in ("a.md", "b.md", "sub/c.csv", "d"):
        (src / name).write_text("x")
    proc = cli("data", "run", "--inputs", str(src), "--out", str(tmp_path / "out"), cwd=tmp_path)
    msg = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, msg
    assert "found 4 file(s)" in msg and ".md: 2" in msg and ".csv: 1" in msg and "(no extension): 1" in msg
    assert ".jsonl" in msg and ".parquet" in msg and ".warc" in msg
    assert "Traceback" not in msg and not (tmp_path / "out" / "docs").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cli("data", "run", "--inputs", str(empty), "--out", str(tmp_path / "out2"), cwd=tmp_path)
    msg = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2 and "empty folder" in msg and ".jsonl" in msg, msg


def test_files_that_give_no_document_fail_the_run(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "random.txt").write_bytes(_random_bytes(2000, 7))
    (src / "empty.jsonl").write_text("\n")
    proc = cli("data", "run", "--inputs", str(src), "--out", str(tmp_path / "out"), cwd=tmp_path)
    msg = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0 and "read 0 documents from 2 file(s)" in msg and "read_error:binary: 1" in msg, msg
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed"


# -- MinHash: candidates are verified before they are merged -------------------------------------------------------------
def _light_copy(text: str, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split()
    for _ in range(max(1, len(words) // 100)):
        words[rng.randrange(len(words))] = rng.choice(words)
    return " ".join(words)


def test_minhash_low_rows_does_not_chain_unrelated_documents(tmp_path):
    from lmforge.data.minhash import MinHasher, MinHashParams, jaccard, near_duplicate_pairs

    text = (DEMO / "books" / "shakespeare-hamlet.txt").read_text()
    bases = [p for p in text.split("\n\n") if len(p.split()) > 80][:12]
    texts = [t for k, b in enumerate(bases) for t in (b, _light_copy(b, k))]  # 12 pairs of near-duplicates
    loose = MinHashParams(ngram=1, bands=40, rows=1)  # one word per shingle, one hash per band: every pair collides
    unverified = near_duplicate_pairs(texts, MinHashParams(1, 40, 1, threshold=0.0))
    assert any(i // 2 != j // 2 for i, j in unverified)  # unrelated paragraphs chained together without the check
    pairs = near_duplicate_pairs(texts, loose)
    sh = MinHasher(loose)
    assert all(jaccard(sh.shingles(texts[i]), sh.shingles(texts[j])) >= 0.6 for i, j in pairs)
    assert all(i // 2 == j // 2 for i, j in pairs) and len(pairs) == 12, pairs

    src = tmp_path / "in"
    src.mkdir()
    for k in range(2):  # two files → two shards
        (src / f"p{k}.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "text": texts[i]}) + "\n"
                                                 for i in range(k, len(texts), 2)))
    out = tmp_path / "out"
    from lmforge.data.stage import Config, run

    run(Config(inputs=[str(src)], shards=2, minhash=True, minhash_ngram=1, minhash_bands=40, minhash_rows=1,
               gopher_quality=False, gopher_repetition=False, langid=False), out)
    kept = sorted(int(d["id"][1:]) for d in iter_documents(out))
    assert kept == list(range(0, 24, 2))  # one of each pair, every original kept


# -- PII on technical text -----------------------------------------------------------------------------------------------
def test_pii_leaves_timestamps_versions_and_section_numbers_alone():
    from lmforge.data.pii import redact

    technical = [  # real lines: Django docs, Debian changelogs, man pages, pip logs
        "'2010-07-04 12:15:58'",
        " -- gregor herrmann <x>  Sun, 23 Jan 2022 03:13:15 +0100",
        "Last-Modified: 2023-02-08T14:03:59Z and 2023-02-08 14:03:59.123456+00:00",
        "  * Update Standards-Version to 4.6.1.0",
        "Downloading novas-3.1.1.3.tar.gz (136kB)",
        "Collecting novas==3.1.1.3 (from -r requirements.txt (line 1))",
        "The lowercasing algorithm used is described in section 3.13 of the Unicode Standard; see section 4.2.1.3.",
        "gcc-12 (12-20220428-1) unstable; urgency=medium",
        "  * Fix DoS vulnerability in libtirpc (CVE-2021-46828) (Closes: #1015873)",
        ".\\\"   Boston, MA 02110-1301  USA",
        "SignatureExpired: Signature age 15.5289158821 > 10 seconds",
        "0 1 1 2 3 5 8 13 21 34 55 89 144 233 377 610 987",
        "\\- deployedModelId: '5251549009234886656'",
    ]
    for line in technical:
        red, counts = redact(line)
        assert red == line and not counts, (line, red)
    real = ("Mail gregoa@debian.org or call +1 (555) 123-4567 or 020 7946 0958; the server is 192.168.0.10, "
            "http://127.0.0.1:8000/admin/, 2001:db8::1; card 4111 1111 1111 1111.")
    red, counts = redact(real)
    assert counts == {"email": 1, "phone": 2, "ipv4": 2, "ipv6": 1, "credit_card": 1}, red


def test_pii_precision_on_the_labelled_technical_set():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "pii_precision.py")], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| kind")}
    assert "phone" not in rows and "credit_card" not in rows  # no timestamp, CVE id, ZIP code or id is redacted
    assert float(rows["all"][-1]) >= 0.95 and "email 1.000, ip 1.000" in proc.stdout
