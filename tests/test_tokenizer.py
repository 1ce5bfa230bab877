"""Tokenizer: byte fallback round trips, the GPT-2 pre-tokenizer regex llama.cpp knows, configurable special tokens,
and compression per language / domain (``lmforge tokenizer eval``) on real multilingual text."""

import json
from pathlib import Path

import pydoc_data.topics
import pytest
import yaml

from lmforge.config import ConfigError, validate
from lmforge.tokenizer import evaluate
from lmforge.tokenizer import stage as tok_stage
from lmforge.tokenizer.bpe import load_tokenizer
from lmforge.tokenizer.shards import load_split, read_index

# The regex llama.cpp uses for its `gpt-2` pre-tokenizer type (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT2)
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

HARD_TEXTS = [
    "naïve café — 東京タワー 한국어 中文分词 🙂 👩‍👩‍👧 🇫🇷",
    "control \x00\x01\x02\x07\x1b[31m red \x7f tab\tCR\r\nLF\n\x0c",
    "".join(map(chr, range(256))),  # every byte value as a code point
    "مرحبا بالعالم  שלום  नमस्ते  e\u0301 (combining) \u200b zero-width \ufeff BOM",
    "   leading and trailing spaces   \n\n\n",
]


def chatterbot_docs(language: str, lang_code: str) -> list[dict]:
    """One document per conversation of the chatterbot-corpus package (real human-written chat, many languages)."""
    corpus = pytest.importorskip("chatterbot_corpus")
    docs = []
    for path in sorted((Path(corpus.__file__).parent / "data" / language).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for n, conv in enumerate(data.get("conversations") or []):
            text = "\n".join(str(turn) for turn in conv if turn is not None)
            if text.strip():
                docs.append({"id": f"{language}/{path.stem}/{n}", "text": text,
                             "meta": {"lang": lang_code, "domain": "chat", "source": "chatterbot"}})
    return docs


def pydoc_docs() -> list[dict]:
    return [{"id": k, "text": t, "meta": {"lang": "en", "domain": "code-docs", "source": "pydoc_data"}}
            for k, t in sorted(pydoc_data.topics.topics.items())]


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    d = tmp_path_factory.mktemp("english")
    return write_jsonl(d / "english.jsonl", pydoc_docs() + chatterbot_docs("english", "en"))


@pytest.fixture(scope="module")
def tokenized(english, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok_stage.run(tok_stage.Config(data=str(english), vocab_size=800, val_fraction=0.2), out)
    return out


def test_any_input_round_trips_through_byte_fallback(tokenized):
    tok, _ = load_tokenizer(tokenized)
    for text in HARD_TEXTS:
        enc = tok.encode(text)
        assert tok.decode(enc.ids) == text
        assert None not in enc.ids and tok.token_to_id("<unk>") is None  # nothing is ever unknown


def test_pre_tokenizer_is_the_gpt2_regex_llama_cpp_knows(tokenized):
    regex = pytest.importorskip("regex")
    spec = json.loads((tokenized / "tokenizer.json").read_text())["pre_tokenizer"]
    assert spec["type"] == "ByteLevel" and spec["use_regex"] is True and spec["add_prefix_space"] is False
    tok, _ = load_tokenizer(tokenized)
    sample = "Hello world, it's 2024!  Don't   stop\n\n  東京 naïve 123abc  \t end"
    table = _byte_decoder()
    ours = [bytes(table[c] for c in piece).decode("utf-8") for piece, _ in tok.pre_tokenizer.pre_tokenize_str(sample)]
    assert ours == regex.findall(GPT2_REGEX, sample)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character table, reversed."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def test_special_tokens_are_configurable(english, tmp_path):
    out = tmp_path / "tok"
    cfg = tok_stage.Config(data=str(english), vocab_size=600, val_fraction=0.1, bos_token="<s>", eos_token="</s>",
                           pad_token="<pad>", chat_start_token="<|turn|>", chat_end_token="<|end_turn|>",
                           extra_special_tokens=["<|tool_call|>"])
    tok_stage.run(cfg, out)
    tok, tcfg = load_tokenizer(out)
    assert [tok.token_to_id(t) for t in ("</s>", "<s>", "<pad>", "<|turn|>", "<|end_turn|>", "<|tool_call|>")] == \
        list(range(6))
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert tcfg["additional_special_tokens"] == ["<|turn|>", "<|end_turn|>", "<|tool_call|>"]
    assert tok.encode("a <|tool_call|> b").ids.count(5) == 1  # never split
    # packing puts the configured eos between documents
    index = read_index(out / "tokens")
    assert index["eos_id"] == 0
    assert int((load_split(out / "tokens", "train") == 0).sum()) == index["splits"]["train"]["docs"]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 0, 2)
    rendered = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|turn|>user\nhi<|end_turn|>\n<|turn|>assistant\n"


def test_bad_special_tokens_name_the_field(english):
    with pytest.raises(ConfigError, match="chat_start_token and chat_end_token must differ"):
        validate(tok_stage.Config, {"data": str(english), "chat_start_token": "<x>", "chat_end_token": "<x>"}, "t.yaml")
    with pytest.raises(ConfigError, match="eos_token: must not be empty"):
        validate(tok_stage.Config, {"data": str(english), "eos_token": ""}, "t.yaml")


def test_compression_per_language_and_domain(tokenized, english, tmp_path):
    foreign = write_jsonl(tmp_path / "foreign.jsonl", chatterbot_docs("chinese", "zh") + chatterbot_docs("russian", "ru"))
    res = evaluate.run(evaluate.Config(tokenizer=str(tokenized), data=[str(english), str(foreign)], split="all",
                                       report_dir=str(tmp_path / "report")))
    by_lang = res["groups"]["lang"]
    assert set(by_lang) == {"en", "zh", "ru"} and set(res["groups"]["domain"]) == {"chat", "code-docs"}
    for field, rows in res["groups"].items():  # every document counted once per grouping
        for k in ("docs", "bytes", "chars", "tokens"):
            assert sum(r[k] for r in rows.values()) == res["overall"][k], (field, k)
    zh_texts = [d["text"] for d in chatterbot_docs("chinese", "zh")]
    assert by_lang["zh"]["bytes"] == sum(len(t.encode("utf-8")) for t in zh_texts)
    # trained on English only: English compresses well, Chinese/Russian fall back to (nearly) raw bytes
    assert by_lang["en"]["bytes_per_token"] > 2.0
    assert by_lang["zh"]["bytes_per_token"] < 1.2 and by_lang["ru"]["bytes_per_token"] < 1.2
    md = (tmp_path / "report" / "compression.md").read_text()
    assert "## by lang" in md and "| zh |" in md
    assert json.loads((tmp_path / "report" / "compression.json").read_text())["overall"] == res["overall"]


def test_held_out_split_matches_the_tokenizer_stage(tokenized, english):
    res = evaluate.evaluate_tokenizer(tokenized, english, group_by=["source"])
    index = read_index(tokenized / "tokens")
    assert res["val_fraction"] == 0.2  # read from the tokenizer artifact's manifest
    assert res["overall"]["docs"] == index["splits"]["val"]["docs"]
    assert res["overall"]["bytes"] == index["splits"]["val"]["bytes"]
    with pytest.raises(ValueError, match="no documents"):
        evaluate.evaluate_tokenizer(tokenized, english, max_docs=1, val_fraction=1e-9)


def test_packing_with_an_existing_tokenizer_reproduces_its_ids(tokenized, english, tmp_path):
    model_like = tmp_path / "model"
    model_like.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_like / name).write_bytes((tokenized / name).read_bytes())
    out = tmp_path / "repacked"
    tok_stage.run(tok_stage.Config(data=str(english), val_fraction=0.2, from_tokenizer=str(model_like),
                                   vocab_size=300), out)  # vocab_size is ignored: the tokenizer is reused
    assert (out / "tokenizer.json").read_bytes() == (tokenized / "tokenizer.json").read_bytes()
    for split in ("train", "val"):
        assert (load_split(out / "tokens", split) == load_split(tokenized / "tokens", split)).all()
    (model_like / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|not-a-token|>"}))
    with pytest.raises(ValueError, match="from_tokenizer: .* names no eos_token"):
        tok_stage.run(tok_stage.Config(data=str(english), from_tokenizer=str(model_like)), tmp_path / "bad")


def test_tokenizer_eval_command_maps_flags_onto_the_config(tokenized, english, tmp_path):
    import typer
    from typer.testing import CliRunner

    from lmforge.config import command_from_config

    app = typer.Typer()
    app.command("eval")(command_from_config(evaluate.Config, evaluate.run))  # what `lmforge tokenizer eval` registers
    app.command("other")(lambda: None)
    res = CliRunner().invoke(app, ["eval", "--tokenizer", str(tokenized), "--data", str(english),
                                   "--group-by", "domain", "--report-dir", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert list(json.loads((tmp_path / "r" / "compression.json").read_text())["groups"]) == ["domain"]
    bad = CliRunner().invoke(app, ["eval", "--tokenizer", str(tokenized), "--data", str(english), "--split", "test"])
    assert bad.exit_code == 2 and "split" in bad.output
