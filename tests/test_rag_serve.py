"""RAG on the server (retrieval-augmented /v1/chat/completions through the official openai client against a real
uvicorn server), constrained yes/no judging, LLM re-ranking and model-judged faithfulness."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from lmforge.model.hf import save_model
from lmforge.model.llama import Llama, LlamaConfig
from lmforge.rag.answer import NOT_FOUND, Answerer
from lmforge.rag.evaluate import QAItem, answer_metrics, faithfulness_judged
from lmforge.rag.http import attach_rag
from lmforge.rag.judge import (EngineJudge, OpenAIJudge, YesNoProcessor, relevance_messages, support_messages,
                               yes_no_token_ids)
from lmforge.rag.stage import Config, build_index
from lmforge.serve.api import create_app
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams
from tests.test_rag import KB_DOCS, Scripted, memo_embedder, one_torch_thread  # noqa: F401  (autouse fixture)

PERSONA = "You are Ada, the friendly support bot of ACME."
KEY = "sk-rag-test"


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    """The real Django FAQ 'general' page, embedded with MiniLM."""
    docs = tmp_path_factory.mktemp("ragdocs")
    shutil.copy(KB_DOCS / "django" / "faq" / "general.html", docs / "general.html")
    kb, _ = build_index(Config(docs=str(docs), chunk_tokens=120, overlap_tokens=20),
                        tmp_path_factory.mktemp("ragidx") / "kb", embedder=memo_embedder())
    return kb


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny random Llama (1024-token context) with a BPE trained on Python's pydoc topics."""
    from pydoc_data.topics import topics

    from lmforge.tokenizer.bpe import train_bpe

    folder = tmp_path_factory.mktemp("ragmodel") / "tiny-rag"
    tok = train_bpe(list(topics.values()), 512, folder)
    eos = tok.token_to_id("<|endoftext|>")
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=eos, eos_token_id=eos)
    model = Llama(cfg)
    model.init_weights(seed=0)
    save_model(model, folder)
    eng = Engine.from_folder(folder, max_num_seqs=4, max_model_len=None)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(kb, engine):
    """create_app + attach_rag, served by uvicorn on a free 127.0.0.1 port; yields the base URL."""
    import uvicorn

    app = create_app(engine, "tiny-rag", api_key=KEY)
    attach_rag(app, Answerer(kb, None, k=2, min_score=0.3, system_prompt=PERSONA, max_tokens=12))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    srv.should_exit = True
    thread.join(timeout=15)
    sock.close()


@pytest.fixture
def client(server):
    return OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


# -- retrieval-augmented chat completions ----------------------------------------------------------------------------
def test_chat_completions_answer_from_the_knowledge_base(client, engine):
    seen: list[list[dict]] = []
    original = engine.encode_chat
    engine.encode_chat = lambda messages: seen.append(messages) or original(messages)
    try:
        q = [{"role": "user", "content": "How do you pronounce Django?"}]
        resp = client.chat.completions.create(model="tiny-rag", messages=q, max_tokens=6)
        rag = resp.model_extra["rag"]
        assert not rag["refused"] and len(rag["sources"]) == 2
        assert any("JANG-oh" in s["text"] for s in rag["sources"])
        assert all(s["path"] == "general.html" and s["end"] > s["start"] for s in rag["sources"])
        assert {c["number"] for c in rag["citations"]} <= {1, 2}
        assert resp.choices[0].finish_reason in ("stop", "length") and resp.usage.completion_tokens <= 6
        system = seen[-1][0]
        assert system["role"] == "system" and system["content"].startswith(PERSONA)
        assert rag["sources"][0]["text"] in system["content"]
        assert resp.usage.prompt_tokens == len(original(seen[-1]))

        # streamed: same (greedy) text, the rag field on the final chunk
        chunks = list(client.chat.completions.create(model="tiny-rag", messages=q, max_tokens=6, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip() == resp.choices[0].message.content  # the final answer is stripped
        last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
        assert last.model_extra["rag"]["sources"] == rag["sources"]
        assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens

        # the request's own system message is the persona
        seen.clear()
        client.chat.completions.create(model="tiny-rag", max_tokens=2, messages=[
            {"role": "system", "content": "You are Bob the builder."}, *q])
        assert seen[-1][0]["content"].startswith("You are Bob the builder.")
    finally:
        engine.encode_chat = original


def test_chat_completions_refuse_follow_up_and_opt_out(client, engine):
    resp = client.chat.completions.create(model="tiny-rag", messages=[
        {"role": "user", "content": "What is the boiling point of liquid nitrogen in kelvin?"}],
        extra_body={"rag": {"mode": "dense"}})
    assert resp.choices[0].message.content == NOT_FOUND
    assert resp.model_extra["rag"]["refused"] and resp.model_extra["rag"]["sources"] == []

    follow = client.chat.completions.create(model="tiny-rag", max_tokens=4, extra_body={"rag": {"k": 1}}, messages=[
        {"role": "user", "content": "Who is Django named after?"},
        {"role": "assistant", "content": "Django Reinhardt."},
        {"role": "user", "content": "And how is it pronounced?"}])
    rag = follow.model_extra["rag"]
    assert rag["standalone_question"] and rag["standalone_question"] != "And how is it pronounced?"
    assert len(rag["sources"]) == 1

    plain = client.chat.completions.create(model="tiny-rag", max_tokens=3, extra_body={"rag": False},
                                           messages=[{"role": "user", "content": "Hello"}])
    assert "rag" not in (plain.model_extra or {}) and plain.usage.completion_tokens <= 3

    with pytest.raises(openai.BadRequestError, match="rag.k"):
        client.chat.completions.create(model="tiny-rag", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"rag": {"k": 0}})
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="tiny-rag", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_rag_query_route_and_api_key_on_the_same_server(server):
    body = {"question": "Under which license is Django distributed?", "k": 2}
    assert httpx.post(f"{server}/rag/query", json=body).status_code == 401
    assert httpx.post(f"{server}/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
                      ).status_code == 401
    r = httpx.post(f"{server}/rag/query", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and any("BSD" in s["text"] for s in r.json()["sources"])


# -- constrained yes / no judging --------------------------------------------------------------------------------------
def test_yes_no_processor_masks_and_scores():
    proc = YesNoProcessor([2, 3], [5])
    logits = torch.full((8,), 10.0)
    logits[2], logits[3], logits[5] = 1.0, 1.0, 0.0
    out = proc([], logits)
    assert torch.isfinite(out).nonzero().flatten().tolist() == [2, 3, 5]
    expected = float(torch.sigmoid(torch.logsumexp(torch.tensor([1.0, 1.0]), 0)))
    assert proc.p_yes == pytest.approx(expected)
    with pytest.raises(ValueError, match="distinct"):
        yes_no_token_ids(lambda w: [7], ["yes"], ["no"])


def test_engine_judge_replies_only_yes_or_no(engine, kb):
    judge = EngineJudge(engine)
    allowed = set(judge.yes_ids) | set(judge.no_ids)
    questions = ["Who is Django named after?", "Is Django a content-management system?", "What is 2 + 2?"]
    for q in questions:
        proc = YesNoProcessor(judge.yes_ids, judge.no_ids)
        res = engine.generate_text(engine.encode_chat([{"role": "user", "content": q}]),
                                   SamplingParams(temperature=0.0, max_tokens=1, logits_processors=[proc]))
        assert res.token_ids[0] in allowed and 0.0 < proc.p_yes < 1.0
    # a strong bias on one 'no' token (built-in processors run first): the judge sees it and says no
    proc = YesNoProcessor(judge.yes_ids, judge.no_ids)
    res = engine.generate_text(engine.encode_chat([{"role": "user", "content": questions[0]}]), SamplingParams(
        temperature=0.0, max_tokens=1, logit_bias={judge.no_ids[0]: 30.0}, logits_processors=[proc]))
    assert res.token_ids == [judge.no_ids[0]] and proc.p_yes < 1e-6
    probs = judge.yes_probabilities([[{"role": "user", "content": q}] for q in questions])
    assert len(probs) == 3 and all(0.0 < p < 1.0 for p in probs)
    again = judge.yes_probabilities([[{"role": "user", "content": q}] for q in questions])
    assert again == pytest.approx(probs, rel=1e-4)  # batched float sums may differ in the last bits

    # the real judge as re-ranker: the order follows its scores
    ans = Answerer(kb, None, k=2, reranker=judge, rerank_depth=5)
    sources, _ = ans.retrieve("How do you pronounce Django?")
    assert len(sources) == 2 and sources[0].relevance >= sources[1].relevance


class KeywordJudge:
    """P(yes) = 0.9 when the asked-about text contains the keyword, else 0.1; records what it was asked."""

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword
        self.asked: list[list[dict]] = []

    def yes_probabilities(self, conversations):
        self.asked.extend(conversations)
        return [0.9 if self.keyword in c[-1]["content"] else 0.1 for c in conversations]


def test_rerank_reorders_retrieved_chunks(kb):
    plain, _ = Answerer(kb, None, k=10).retrieve("What does Django mean?")
    target = next(s for s in plain[1:] if "BSD" in s.text)  # a chunk the retriever ranks lower
    judge = KeywordJudge("BSD")
    sources, _ = Answerer(kb, None, k=2, reranker=judge, rerank_depth=10).retrieve("What does Django mean?")
    assert len(judge.asked) == 10 and "Question: What does Django mean?" in judge.asked[0][-1]["content"]
    assert sources[0].text == target.text and sources[0].relevance == 0.9 and sources[0].number == 1
    assert sources[1].relevance == 0.9 if "BSD" in sources[1].text else sources[1].relevance == 0.1


def test_faithfulness_judged_and_in_answer_metrics(kb):
    sources = {1: "Django is pronounced JANG-oh.", 2: "Django is distributed under the 3-clause BSD license."}
    judge = KeywordJudge("JANG-oh")
    fa = faithfulness_judged("It is pronounced JANG-oh [1]. It is BSD [2]. It is old [7]. No citation.", sources,
                             judge)
    assert fa["cited_sentences"] == 3 and fa["supported_sentences"] == 1 and fa["faithfulness"] == pytest.approx(1 / 3, abs=1e-3)
    assert [s["supported"] for s in fa["sentences"]] == [True, False, False]
    assert "Statement: It is pronounced JANG-oh." in judge.asked[0][-1]["content"]
    assert faithfulness_judged("No citations at all.", sources, judge)["faithfulness"] is None

    items = [QAItem("a", "How do you pronounce Django?", ["JANG-oh"], [{"path": "general.html", "quote": "JANG-oh"}]),
             QAItem("b", "What is the boiling point of liquid nitrogen?", [], [])]
    ans = Answerer(kb, Scripted("Django is pronounced JANG-oh [1]."), k=2, min_score=0.45)
    m = answer_metrics(ans, items, judge=KeywordJudge("JANG-oh"))
    assert m["faithfulness_judged"] == 1.0 and m["refusal_rate_unanswerable"] == 1.0
    assert m["rows"][0]["faithfulness_judged"] == 1.0 and "faithfulness_judged" not in m["rows"][1]


def test_openai_judge_against_our_own_server(server, engine):
    """OpenAIJudge over HTTP (logprobs + top_logprobs) against the lmforge server; ``rag: false`` keeps the judge's
    prompt away from the knowledge base.  Plumbing, not quality (the model is random)."""
    asks = [support_messages("Django is pronounced JANG-oh.", "Django is pronounced JANG-oh."),
            relevance_messages("Under which license is Django distributed?", "Django is named after a guitarist.")]
    seen: list[list[dict]] = []
    original = engine.encode_chat
    engine.encode_chat = lambda messages: seen.append(messages) or original(messages)
    try:
        judge = OpenAIJudge("tiny-rag", base_url=server, api_key=KEY, extra_body={"rag": False})
        probs = judge.yes_probabilities(asks)
        # the same judge without the opt-out gets a retrieval-augmented reply: its prompt is not what reaches the model
        seen_plain = list(seen)
        seen.clear()
        OpenAIJudge("tiny-rag", base_url=server, api_key=KEY).yes_probabilities(asks[:1])
    finally:
        engine.encode_chat = original
    assert len(probs) == 2 and all(0.0 <= p <= 1.0 for p in probs)
    assert seen_plain == asks  # exactly the judge's conversations, unchanged
    assert seen and seen[-1] != asks[0] and "Sources:" in seen[-1][0]["content"]  # the system message + sources
    with pytest.raises(openai.AuthenticationError):
        OpenAIJudge("tiny-rag", base_url=server, api_key="wrong").yes_probabilities(asks[:1])


def test_served_knowledge_base_embeds_queries_on_the_engine_driver(kb, engine, tmp_path):
    """`lmforge serve --rag-index`: the query embedder runs on the engine's driving thread, not on request threads
    (PyTorch work there would slow every later decode step, see lmforge/serve/engine.py)."""
    from lmforge.rag.http import attach_knowledge_base

    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(KB_DOCS / "django" / "faq" / "general.html", docs / "general.html")
    build_index(Config(docs=str(docs), chunk_tokens=120, overlap_tokens=20), tmp_path / "kb", embedder=memo_embedder())
    app = create_app(engine, "tiny-rag")
    answerer = attach_knowledge_base(app, tmp_path / "kb")
    seen: list[threading.Thread] = []
    inner = answerer.kb.embedder.embedder
    original = inner.embed
    inner.embed = lambda texts: seen.append(threading.current_thread()) or original(texts)
    stop = threading.Event()
    driver = threading.Thread(target=engine.run_forever, kwargs={"stop": stop.is_set})
    driver.start()
    try:
        while engine._driver is not driver:
            time.sleep(0.01)
        hits = answerer.kb.search("What does Django mean?", k=2)
    finally:
        stop.set()
        driver.join(10)
    assert seen == [driver] and hits
    torch.testing.assert_close(torch.tensor(answerer.kb.embed_query("What does Django mean?")),
                               torch.tensor(original(["What does Django mean?"])[0]))
