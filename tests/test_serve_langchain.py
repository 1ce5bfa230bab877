"""LangChain's ``ChatOpenAI`` talks to our server unchanged (invoke, stream, batch).  Skipped when
``langchain-openai`` is not installed (it is not a core dependency)."""

from __future__ import annotations

import pytest
from test_serve import _build_serve_model

from lmforge.serve.engine import Engine
from lmforge.serve.smoke import running_server

langchain_openai = pytest.importorskip("langchain_openai")

NAME = "tiny-chat"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("langchain") / NAME
    _build_serve_model(folder)
    engine = Engine.from_folder(folder, max_num_seqs=4, max_model_len=None)
    try:
        with running_server(engine, NAME) as base:
            yield base
    finally:
        engine.shutdown()


def _llm(url: str, **kw):
    return langchain_openai.ChatOpenAI(base_url=url, api_key="none", model=NAME, temperature=0.0, max_retries=0,
                                       timeout=60, **kw)


def test_chat_openai_invoke_stream_and_batch(url):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    llm = _llm(url, max_tokens=6)
    messages = [SystemMessage("You answer briefly."), HumanMessage("What does the with statement do?")]
    reply = llm.invoke(messages)
    assert isinstance(reply, AIMessage) and reply.content
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.usage_metadata["output_tokens"] <= 6 and reply.usage_metadata["input_tokens"] > 0

    chunks = list(llm.stream(messages))
    assert len(chunks) > 1
    assert "".join(c.content for c in chunks) == reply.content  # greedy: streamed text == non-streamed text

    batch = llm.batch([messages, [HumanMessage("What is a generator?")]])
    assert batch[0].content == reply.content and batch[1].content


def test_chat_openai_unknown_model_raises_openai_error(url):
    import openai

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        langchain_openai.ChatOpenAI(base_url=url, api_key="none", model="no-such-model", max_retries=0,
                                    max_tokens=2).invoke("hi")
