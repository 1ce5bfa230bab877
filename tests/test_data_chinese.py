"""Chinese specifics (width, OpenCC, punctuation-aware line rules, PII, spam list) and bad multilingual input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmforge.data.cjk import CjkNormalize, normalize_width
from lmforge.data.documents import Document
from lmforge.data.filters import C4Quality
from lmforge.data.io import iter_documents
from lmforge.data.langprofiles import LangProfiles
from lmforge.data.pii import redact
from lmforge.data.stage import Config, run
from tests.test_data import check_conservation

CORPUS = Path(__file__).resolve().parent.parent / "data" / "multilingual"


def test_width_normalisation_keeps_chinese_punctuation():
    assert normalize_width("型号ＡＢＣ１２３，价格＄５０。") == "型号ABC123，价格$50。"
    assert normalize_width("ｶﾀｶﾅとﾃﾞｰﾀ") == "カタカナとデータ"
    assert normalize_width("plain ascii") == "plain ascii"
    step = CjkNormalize()
    d = step.process(Document("a", "电话：１３８１２３４５６７８", {"lang": "zh"}))
    assert d.text == "电话：13812345678" and step.stats.tallies["changed"] == {"width": 1}


def test_traditional_to_simplified_only_for_chinese_documents():
    pytest.importorskip("opencc")
    step = CjkNormalize(zh_convert="t2s")
    zh = step.process(Document("t", "這段文字使用繁體中文書寫，臺灣。", {"lang": "zh"}))
    assert zh.text == "这段文字使用繁体中文书写，台湾。" and zh.meta["zh_converted"] == "t2s"
    ja = step.process(Document("j", "漢字の國", {"lang": "ja"}))
    assert ja.text == "漢字の國" and "zh_converted" not in ja.meta
    with pytest.raises(ValueError, match="unknown Chinese conversion 'x2y'"):
        CjkNormalize(zh_convert="x2y")


def test_stage_converts_the_traditional_corpus(tmp_path):
    pytest.importorskip("opencc")
    if not (CORPUS / "zh-tw.jsonl").is_file():
        pytest.skip("data/multilingual is built at install time from Debian packages (make install)")
    src = tmp_path / "in"
    src.mkdir()
    (src / "zh-tw.jsonl").write_text((CORPUS / "zh-tw.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    run(Config(inputs=[str(src)], shards=1, zh_convert="t2s"), tmp_path / "out")
    check_conservation(tmp_path / "out")
    kept = list(iter_documents(tmp_path / "out"))
    zh = [d for d in kept if d["meta"]["lang"] == "zh"]  # (a few pieces are mostly untranslated English)
    assert len(zh) >= 12 and all(d["meta"].get("zh_converted") == "t2s" for d in zh)
    assert not any("說明" in d["text"] or "軟體" in d["text"] for d in kept)  # mixed documents' Chinese too
    with pytest.raises(ValueError, match="zh_convert needs language ID"):
        run(Config(inputs=[str(src)], langid=False, zh_convert="t2s"), tmp_path / "out2")


def test_c4_line_rules_know_chinese_closing_punctuation():
    text = "\n".join(["他说：「今天的天气非常好，我们一起去公园散步吧。」"] * 3 + ["这是第二段文字，说明了一些事情。"] * 3)
    english = C4Quality(min_sentences=1).process(Document("c", text, {"lang": "zh"}))
    assert english.meta["scores"]["c4_lines_removed"] == 3  # the lines ending in 」
    chinese = C4Quality(min_sentences=1, profiles=LangProfiles.load()).process(Document("c", text, {"lang": "zh"}))
    assert chinese.meta["scores"]["c4_lines_removed"] == 0 and chinese.meta["scores"]["sentences"] == 6


def test_chinese_pii():
    text, counts = redact("请拨打13812345678或+86 139-1234-5678联系，银行卡号6222 0212 3456 7890 128，"
                          "身份证号11010519491231002X。订单号20240101123456789012，版本1.3.8。")
    assert counts == {"cn_id": 1, "cn_bank_card": 1, "cn_mobile": 2}
    assert "<PHONE>或<PHONE>联系" in text and "<BANK_CARD>" in text and "20240101123456789012" in text
    # a UnionPay-like number that fails Luhn is a card only right after 卡号 / 账号 ...
    assert redact("卡号：6217000010012345671")[1] == {"cn_bank_card": 1}
    assert redact("编号 6217000010012345671 的记录")[1] == {}
    assert "cn_mobile" not in redact("号码12812345678")[1]  # 12x is no mobile prefix


def test_chinese_spam_and_word_list():
    pytest.importorskip("glin_profanity")
    from lmforge.data.toxicity import Toxicity

    step = Toxicity(classifier=False)
    spam = "欢迎来到真人娱乐城，百家乐、六合彩、时时彩稳赚不赔，加微信领取彩金，代开发票。" * 2
    clean = "早餐喝一杯豆乳，再吃一个包子。今天的会议讨论了数据清洗的流程和中文分词的方法。" * 2
    out = step.process_batch([Document("s", spam, {"lang": "zh"}), Document("c", clean, {"lang": "zh"})])
    assert out[0] == "spam_words"
    assert isinstance(out[1], Document) and out[1].meta["scores"]["badwords"] == 0 and out[1].meta["scores"]["spam"] == 0


def _write_bad_inputs(src: Path) -> None:
    zh = "中华人民共和国是一个位于东亚的国家，首都是北京。这里的文字使用简体中文书写，用于测试编码的检测是否正确。" * 4
    tw = "中華民國的首都是臺北，這段文字使用繁體中文書寫，用來測試編碼的偵測是否正確，也測試轉換的結果。" * 4
    (src / "gbk.html").write_bytes(f"<html><head><title>测试</title></head><body><p>{zh}</p></body></html>".encode("gbk"))
    (src / "big5.html").write_bytes(f"<html><body><p>{tw}</p></body></html>".encode("big5"))
    (src / "mixed-encodings.txt").write_bytes(("第一部分是UTF-8编码的中文句子，用来测试混合编码的文件。\n" * 6).encode("utf-8")
                                              + ("第二部分是GBK编码的中文句子，和上面的内容在同一个文件里。\n" * 6).encode("gbk"))
    (src / "cuneiform.txt").write_text("\U00012000\U00012001\U00012002 \U00012003\U00012004 " * 60, encoding="utf-8")
    (src / "vietnamese.txt").write_text(  # Vietnamese has no profile: the fallback applies
        "Hà Nội là thủ đô của Việt Nam và là thành phố lớn thứ hai của đất nước sau Thành phố Hồ Chí Minh. "
        "Thành phố nằm bên bờ sông Hồng, có lịch sử hơn một nghìn năm với nhiều đền chùa, hồ nước và khu phố cổ. "
        "Người dân ở đây thường ăn phở vào buổi sáng và uống cà phê trên vỉa hè. Mùa thu được xem là mùa đẹp "
        "nhất trong năm, khi trời mát và lá vàng rơi trên các con đường. Du khách có thể đi bộ quanh Hồ Gươm, "
        "thăm Văn Miếu hoặc xem múa rối nước vào buổi tối. Giao thông khá đông đúc vì có rất nhiều xe máy, "
        "nhưng hệ thống xe buýt và đường sắt đô thị đang được mở rộng.", encoding="utf-8")
    (src / "noise.txt").write_bytes(os.urandom(3000))


def test_bad_multilingual_input_is_decoded_or_dropped_with_a_reason(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _write_bad_inputs(src)
    out = tmp_path / "out"
    run(Config(inputs=[str(src)], shards=2, min_words=20), out)
    stats = check_conservation(out)
    docs = {Path(d["meta"]["source"]).name: d for d in iter_documents(out)}
    dropped = {Path(d["meta"]["source"]).name: d for f in (out / "dropped").glob("*.jsonl.zst")
               for d in iter_documents(f)}
    every = {**docs, **dropped}
    # GB2312/GBK and Big5 pages without a charset declaration, a file mixing UTF-8 and GBK lines: decoded
    assert "北京" in every["gbk.html"]["text"] and every["gbk.html"]["meta"]["lang"] == "zh"
    assert "臺北" in every["big5.html"]["text"] and every["big5.html"]["meta"]["lang"] == "zh"
    mixed = every["mixed-encodings.txt"]
    assert mixed["meta"]["encoding"].startswith("utf-8+") and "第二部分是GBK编码" in mixed["text"]
    # an unknown script is undetermined (no language's rules applied), a language without a profile gets the fallback
    assert every["cuneiform.txt"]["meta"]["lang"] == "und" and every["cuneiform.txt"]["meta"]["script"] == "other"
    assert every["vietnamese.txt"]["meta"]["lang"] == "vi" and "vietnamese.txt" in docs
    gq = next(s for s in stats["steps"] if s["name"] == "gopher_quality_v2")
    assert "fallback (vi)" in gq["tallies"]["profile"]
    # random bytes: not read, counted as a read error (never a crash)
    assert "noise.txt" not in every and stats["read"]["errors"].get("read_error:binary") == 1
    langid = next(s for s in stats["steps"] if s["name"] == "langid_v1")
    assert langid["tallies"]["script"]["other"] == 1 and langid["tallies"]["lang"]["und"] == 1
    for d in dropped.values():
        assert d["meta"]["drop_reason"] and d["meta"]["drop_step"]
    assert "Per language" in (out / "report.html").read_text()
    json.dumps(stats)  # the stats stay serialisable
