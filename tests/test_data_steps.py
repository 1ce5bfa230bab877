"""Tests of the data stage's language, rule, line, PII, toxicity and MinHash steps on hand-written and real text."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.documents import Document
from lmforge.data.filters import C4Quality, FineWebQuality, LineJunk, count_sentences
from lmforge.data.io import iter_documents
from lmforge.data.langid import LanguageId
from lmforge.data.minhash import MinHasher, UnionFind, jaccard, near_duplicate_pairs
from lmforge.data.pii import PiiRedact, cn_id_ok, luhn_ok, redact
from lmforge.data.stage import Config, run
from lmforge.data.steps import HtmlExtract
from lmforge.data.toxicity import Toxicity, badword_count

from test_data import DAODEJING, DEMO, hamlet_scene, pipeline

def topics() -> dict[str, str]:
    return {d["id"]: d["text"] for d in iter_documents(DEMO / "jsonl" / "python-topics.jsonl.zst")}


# ----------------------------------------------------------------------------------------------------------------------
# language ID


SPANISH = ("En un lugar de la Mancha, de cuyo nombre no quiero acordarme, no ha mucho tiempo que vivía un hidalgo de "
           "los de lanza en astillero, adarga antigua, rocín flaco y galgo corredor.")


def test_langid_labels_and_keep_list():
    docs = [Document("en", hamlet_scene(), {}), Document("zh", DAODEJING, {}), Document("es", SPANISH, {})]
    step = LanguageId(langs=["en", "zh"], min_score=0.5)
    out = pipeline(docs, step)
    assert [d.meta["lang"] for d in out] == ["en", "zh", "es"]
    assert all(0.5 < d.meta["lang_score"] <= 1 for d in out)
    assert [d.meta.get("drop_reason") for d in out] == [None, None, "lang_not_kept"]
    assert step.stats.tallies["lang"] == {"en": 1, "zh": 1, "es": 1}


def test_langid_reads_the_whole_document_and_per_language_thresholds():
    # the first 80 characters are Chinese, the rest (most of the text) English: a truncating detector says zh
    mixed = DAODEJING[:80] + "\n" + hamlet_scene()[:3000]
    (d,) = pipeline([Document("mixed", mixed, {})], LanguageId())
    assert d.meta["lang"] == "en"
    # an impossible threshold for English only drops the English document
    out = pipeline([Document("en", hamlet_scene(), {}), Document("zh", DAODEJING, {})],
                   LanguageId(thresholds={"en": 1.01}))
    assert [x.meta.get("drop_reason") for x in out] == ["lang_score_low", None]


# ----------------------------------------------------------------------------------------------------------------------
# C4 / FineWeb / line junk


C4_PAGE = """Home
About us
The sockets module provides access to the BSD socket interface. It is available on all modern Unix systems.
Sockets are used nearly everywhere, but are one of the most severely misunderstood technologies around [3].
This is a 10,000 foot overview of sockets. It's not really a tutorial, you'll still have work to do.
Please enable JavaScript to view the comments.
We use cookies to improve your experience. See our privacy policy.
Read more...
Copyright 2024 Example Inc."""


def test_c4_keeps_punctuated_lines_and_counts_sentences():
    (d,) = pipeline([Document("p", C4_PAGE, {})], C4Quality())
    assert not d.dropped, d.meta
    assert d.text.splitlines() == [
        "The sockets module provides access to the BSD socket interface. It is available on all modern Unix systems.",
        "Sockets are used nearly everywhere, but are one of the most severely misunderstood technologies around .",
        "This is a 10,000 foot overview of sockets. It's not really a tutorial, you'll still have work to do.",
        "Copyright 2024 Example Inc.",  # C4 keeps it: three words and a full stop
    ]
    assert d.meta["scores"]["sentences"] == 6 and d.meta["scores"]["c4_lines_removed"] == 5
    assert count_sentences("One. Two! Three? “Four.”") == 4
    (few,) = pipeline([Document("q", "\n".join(C4_PAGE.splitlines()[2:4]), {})], C4Quality())
    assert few.meta["drop_reason"] == "too_few_sentences"
    (code,) = pipeline([Document("c", C4_PAGE + "\nUse a dict like {'a': 1} for this.", {})], C4Quality())
    assert code.meta["drop_reason"] == "curly_bracket"
    (lorem,) = pipeline([Document("l", "Lorem ipsum dolor sit amet, consectetur adipiscing.\n" + C4_PAGE, {})],
                        C4Quality())
    assert lorem.meta["drop_reason"] == "lorem_ipsum"


def test_c4_and_fineweb_keep_chinese():
    text = DAODEJING.replace("。", "。\n")
    (c4,) = pipeline([Document("ddj", text, {})], C4Quality())
    assert not c4.dropped, c4.meta
    (fw,) = pipeline([Document("ddj", DAODEJING, {})], FineWebQuality())
    assert not fw.dropped, fw.meta


def test_fineweb_rules():
    (prose,) = pipeline([Document("h", hamlet_scene(), {})], FineWebQuality(char_duplicates_ratio=0.05))
    assert not prose.dropped, prose.meta
    links = "\n".join(f"os.path.{n}" for n in ("join", "split", "exists", "isdir", "isfile", "abspath"))
    (idx,) = pipeline([Document("i", links, {})], FineWebQuality())
    assert idx.meta["drop_reason"] == "line_punct_ratio"
    lines = ["A short line.", "Another one here.", "And a third one."] * 2
    (short,) = pipeline([Document("s", "\n".join(lines[:3]), {})], FineWebQuality())
    assert short.meta["drop_reason"] == "short_line_ratio"
    para = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife.")
    (dup,) = pipeline([Document("d", "\n".join([para, para, para + " Indeed."]), {})], FineWebQuality())
    assert dup.meta["drop_reason"] == "char_dup_ratio"
    words = "\n".join(f"{w} and the rest of the sentence goes on for a while." for w in "abcdefgh")
    (ok,) = pipeline([Document("w", words, {})], FineWebQuality())
    assert not ok.dropped
    listy = "\n".join(f"Item number {i} of the list, with a few more words." for i in range(10))
    (lst,) = pipeline([Document("l", listy, {})], FineWebQuality(new_line_ratio=0.05))
    assert lst.meta["drop_reason"] == "list_ratio"


def test_line_junk_removes_navigation_and_symbols_only():
    text = ("Skip to main content\n» » » | | ---\n"
            "We use cookies to give you the best experience.\n"
            "The heapq module provides an implementation of the heap queue algorithm.\n"
            "Read more about cookies in the reference manual before you set them.\n"
            "Read more\n© 2001-2023 Python Software Foundation")
    step = LineJunk()
    (d,) = pipeline([Document("j", text, {})], step)
    assert d.text.splitlines() == [
        "The heapq module provides an implementation of the heap queue algorithm.",
        "Read more about cookies in the reference manual before you set them.",
    ]
    assert d.meta["lines_removed"] == {"boilerplate": 4, "symbols": 1}
    (empty,) = pipeline([Document("e", "Home\nMenu\nSearch", {})], LineJunk())
    assert empty.meta["drop_reason"] == "empty_after_line_filter"
    (strict,) = pipeline([Document("s", "A heading\nA sentence that ends.", {})], LineJunk(require_terminal_punct=True))
    assert strict.text == "A sentence that ends."
    (cjk,) = pipeline([Document("z", DAODEJING, {})], LineJunk(require_terminal_punct=True))
    assert cjk.text == DAODEJING


# ----------------------------------------------------------------------------------------------------------------------
# PII and toxicity


def test_pii_redaction_validates_numbers():
    text = ("Write to guido@python.org or call +1 (555) 123-4567. Server 192.168.1.20, IPv6 2001:db8::8a2e:370:7334. "
            "Card 4111 1111 1111 1111; not a card: 4111 1111 1111 1112. 身份证 11010519491231002X, 错 110105194912310021. "
            "Python 3.11.2 came out in 2023-02-08; see PEP 8 and 999.1.1.1 and 12:30:45.")
    red, counts = redact(text)
    assert counts == {"email": 1, "phone": 1, "ipv4": 1, "ipv6": 1, "credit_card": 1, "cn_id": 1}
    for s in ("guido@", "555", "192.168", "2001:db8", "4111 1111 1111 1111", "11010519491231002X"):
        assert s not in red
    for s in ("4111 1111 1111 1112", "110105194912310021", "3.11.2", "2023-02-08", "999.1.1.1", "12:30:45"):
        assert s in red
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert cn_id_ok("11010519491231002X") and not cn_id_ok("11010519491231002Y".replace("Y", "1"))
    step = PiiRedact(["email"])
    (d,) = pipeline([Document("p", text, {})], step)
    assert d.meta["pii"] == {"email": 1} and "<EMAIL>" in d.text and "192.168.1.20" in d.text
    with pytest.raises(ValueError, match="unknown PII kinds"):
        PiiRedact(["ssn"])


def test_toxicity_words_and_classifier():
    insult = "You are a fucking idiot and a worthless piece of shit."
    zh = "他妈的，你这个混蛋。"
    clean = hamlet_scene()[:2000]
    step = Toxicity()
    out = pipeline([Document("a", insult, {}), Document("z", zh, {"lang": "zh"}), Document("h", clean, {"lang": "en"})],
                   step)
    assert out[0].meta["drop_reason"] == "toxic_words" and out[0].meta["scores"]["toxicity"] > 0.9
    assert out[1].meta["drop_reason"] == "toxic_words"  # the Chinese list, via meta.lang
    assert not out[2].dropped and out[2].meta["scores"]["badwords"] == 0
    assert badword_count(zh, ("en",)) == 0  # the English list alone does not see it
    (only_score,) = pipeline([Document("a", insult, {})], Toxicity(max_badword_ratio=1.0, max_toxicity=0.5))
    assert only_score.meta["drop_reason"] == "toxic_score"
    assert step.stats.to_dict() == {"name": "toxicity_v1", "in": 3, "kept": 1, "dropped": {"toxic_words": 2}}


# ----------------------------------------------------------------------------------------------------------------------
# MinHash


def planted_near_duplicates(n_base: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Real pydoc topics (distinct texts) plus 2 edited copies of each, words changed, dropped or inserted: one copy
    lightly (1 edit per 100 words: Jaccard ≈ 0.9), one heavily (1 per 8 words: Jaccard ≈ 0.4, not a near-duplicate)."""
    rng = random.Random(seed)
    bases = [t for t in topics().values() if len(t.split()) > 150][:n_base]
    texts, family = [], []
    for f, base in enumerate(bases):
        texts.append(base)
        family.append(f)
        words = base.split()
        for k in range(2):
            w = list(words)
            for _ in range(max(1, len(w) // (100 if k == 0 else 8))):
                i = rng.randrange(len(w))
                op = rng.random()
                if op < 0.4:
                    w[i] = rng.choice(words)
                elif op < 0.7:
                    del w[i]
                else:
                    w.insert(i, rng.choice(words))
            texts.append(" ".join(w))
            family.append(f)
    return texts, family


def test_minhash_precision_recall_on_planted_near_duplicates():
    texts, family = planted_near_duplicates(20)
    hasher = MinHasher()
    shingles = [hasher.shingles(t) for t in texts]
    truth = {(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))
             if family[i] == family[j] and jaccard(shingles[i], shingles[j]) >= 0.8}
    found = near_duplicate_pairs(texts)
    true_found = {p for p in found if jaccard(shingles[p[0]], shingles[p[1]]) >= 0.8}
    precision = len(true_found) / len(found)
    recall = len(truth & found) / len(truth)
    assert len(truth) >= 20
    assert recall >= 0.9 and precision >= 0.9, (precision, recall)
    assert all(family[i] == family[j] for i, j in found)  # no link between different topics


def test_minhash_signature_estimates_jaccard():
    texts, _ = planted_near_duplicates(3)
    h = MinHasher()
    a, b = texts[0], texts[2]
    est = float(np.mean(h.signature(a) == h.signature(b)))
    assert abs(est - jaccard(h.shingles(a), h.shingles(b))) < 0.15
    assert (h.band_keys(a) == MinHasher().band_keys(a)).all()  # deterministic across instances (and processes)
    uf = UnionFind(5)
    uf.union(3, 4)
    uf.union(4, 1)
    assert uf.roots().tolist() == [0, 1, 2, 1, 1]


def test_stage_minhash_across_shards_and_resume(tmp_path):
    texts, family = planted_near_duplicates(12, seed=1)
    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):  # three files → three shards; families spread over them
        with open(src / f"part{k}.jsonl", "w") as f:
            for i in range(k, len(texts), 3):
                f.write(json.dumps({"id": f"t{i}", "text": texts[i], "family": family[i]}) + "\n")
    cfg = Config(inputs=[str(src)], shards=3, minhash=True, gopher_quality=False, gopher_repetition=False)
    m = run(cfg, tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    kept = list(iter_documents(tmp_path / "out"))
    assert m.metrics["steps"][-1] == "minhash_dedup_v1"
    near = stats["steps"][-1]
    assert near["name"] == "minhash_dedup_v1" and near["in"] == near["kept"] + near["dropped"]["near_duplicate"]
    fams = [d["meta"]["family"] for d in kept]
    assert len(set(fams)) == 12  # every family survives
    assert 12 + 8 <= len(kept) <= 12 + 12  # the light copies are removed, most heavily edited ones stay
    dropped = list(iter_documents(tmp_path / "out" / "dropped"))
    ids = {d["id"]: d for d in kept}
    for d in dropped:
        if d["meta"]["drop_reason"] == "near_duplicate":
            assert ids[d["meta"]["duplicate_of"]]["meta"]["family"] == d["meta"]["family"]
    assert sum(int(k) * v for k, v in near["tallies"]["cluster_size"].items()) >= 24


# ----------------------------------------------------------------------------------------------------------------------
# the stage with every step on: conservation, report


def test_stage_all_steps_report_and_conservation(tmp_path):
    from test_data import check_conservation

    src = tmp_path / "in"
    (src / "html").mkdir(parents=True)
    for name in ("library/copy.html", "genindex-J.html", "faq/gui.html", "howto/sockets.html"):
        (src / "html" / Path(name).name).write_bytes((DEMO / "html" / name).read_bytes())
    with open(src / "mixed.jsonl", "w") as f:
        for i, text in enumerate([DAODEJING, SPANISH * 8, hamlet_scene()[:4000],
                                  "Contact webmaster@example.org or +44 20 7946 0958. " + hamlet_scene()[4000:8000]]):
            f.write(json.dumps({"id": f"m{i}", "text": text}) + "\n")
    cfg = Config(inputs=[str(src)], shards=2, line_junk=True, langs=["en", "zh"], lang_min_score=0.5,
                 fineweb_quality=True, toxicity=True, pii=True, minhash=True, min_stop_words=0)
    m = run(cfg, tmp_path / "out")
    stats = check_conservation(tmp_path / "out")
    names = [s["name"] for s in stats["steps"]]
    assert names == ["html_extract_v1", "unicode_normalize_v1", "line_junk_v1", "langid_v1", "cjk_normalize_v1",
                     "gopher_repetition_v2",
                     "gopher_quality_v2", "fineweb_quality_v2", "toxicity_v1", "pii_redact_v1", "exact_dedup_v1",
                     "minhash_dedup_v1"] == m.metrics["steps"]
    lang = next(s for s in stats["steps"] if s["name"] == "langid_v1")
    assert lang["tallies"]["lang"]["en"] >= 5 and lang["tallies"]["lang"]["zh"] == 1
    assert lang["dropped"] == {"lang_not_kept": 1, "lang_score_low": 1}  # the Spanish text; the index page "Index – J"
    kept = {d["id"]: d for d in iter_documents(tmp_path / "out")}
    assert kept["m0"]["meta"]["lang"] == "zh"  # Chinese survives every rule
    assert "<EMAIL>" in kept["m3"]["text"] and kept["m3"]["meta"]["pii"] == {"email": 1, "phone": 1}
    assert all(s["seconds"] >= 0 and s["us_per_doc"] is not None for s in stats["steps"] if s["in"])
    assert stats["profile"]["lang"]["zh"] == 1
    report = (tmp_path / "out" / "report.html").read_text()
    for needle in ("<svg", "kept documents by language", "langid_v1: lang", "pii_redact_v1: pii", "µs / doc"):
        assert needle in report


# ----------------------------------------------------------------------------------------------------------------------
# quality classifier


def quality_sets() -> tuple[list[str], list[str]]:
    """Good: the bundled books and Python's pydoc topics.  Bad: real web junk from the bundled HTML and WARC pages —
    the index / search pages' full text and every page's boilerplate (full-page lines the main-content extractor
    drops: navigation, sidebars, footers)."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    from lmforge.data.readers import ReadLog, read_file

    good = [d.text for p in sorted((DEMO / "books").iterdir()) for d in read_file(p, ReadLog(quiet=True))]
    good += list(topics().values())
    bad = []
    pages = sorted((DEMO / "html").rglob("*.html")) + [DEMO / "warc" / "django-docs.warc.gz"]
    for p in pages:
        for d in read_file(p, ReadLog(quiet=True)):
            tree = HTMLTree.parse(d.text)
            full = extract_plain_text(tree, main_content=False)
            if any(k in p.name for k in ("genindex", "search", "modindex")):
                bad.append(full)
                continue
            main = set(extract_plain_text(tree, main_content=True).splitlines())
            bad.append("\n".join(ln for ln in full.splitlines() if ln.strip() and ln not in main))
    return good, bad


def test_quality_classifier_beats_length_baseline(tmp_path):
    from lmforge.data.quality import QualityModel, QualityScore, train_quality

    good, bad = quality_sets()
    metrics = train_quality(good, bad, tmp_path / "q")
    print("quality classifier:", metrics)
    assert metrics["test_pieces"] >= 50
    assert metrics["auc"] >= 0.95 and metrics["auc"] > metrics["length_baseline_auc"] + 0.1, metrics
    assert metrics["precision"] >= 0.9 and metrics["recall"] >= 0.9, metrics
    model = QualityModel.load(tmp_path / "q")
    assert model.meta["metrics"] == metrics
    step = QualityScore(tmp_path / "q", threshold=0.5)
    (genindex,) = pipeline([read_html_doc("genindex-Q.html")], HtmlExtract(main_content=False))
    out = pipeline([Document("h", hamlet_scene()[:3000], {}), genindex], step)
    assert out[0].meta["quality"] > 0.5 and not out[0].dropped
    assert out[1].meta["drop_reason"] == "quality_low"
    with pytest.raises(FileNotFoundError, match="quality_model.npz"):
        QualityModel.load(tmp_path)


def read_html_doc(name: str) -> Document:
    from lmforge.data.readers import ReadLog, read_file

    return next(read_file(DEMO / "html" / name, ReadLog(quiet=True)))


def test_stage_quality_step(tmp_path):
    from lmforge.data.quality import train_quality

    good, bad = quality_sets()
    train_quality(good, bad, tmp_path / "q")
    src = tmp_path / "in"
    src.mkdir()
    for name in ("genindex-J.html", "library/copy.html", "tutorial/appetite.html"):
        (src / Path(name).name).write_bytes((DEMO / "html" / name).read_bytes())
    m = run(Config(inputs=[str(src)], shards=1, quality_model=str(tmp_path / "q"), quality_threshold=0.7,
                   gopher_quality=False, gopher_repetition=False), tmp_path / "out")
    assert "quality_model" in m.inputs
    kept = list(iter_documents(tmp_path / "out"))
    assert all(d["meta"]["quality"] >= 0.7 for d in kept) and len(kept) == 2
    assert m.metrics["dropped_by_reason"] == {"quality_low": 1}  # the index page
