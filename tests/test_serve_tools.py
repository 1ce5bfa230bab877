"""Structured output and function calling through a real server, with the clients users have: the official
``openai`` client (``response_format``, ``chat.completions.parse`` with a pydantic model, ``tools`` / ``tool_choice``,
streamed tool-call deltas, vLLM's ``guided_*`` / ``structured_outputs`` through ``extra_body``), LangChain's
``bind_tools`` and ``with_structured_output``, and a manual tool loop.  The model is a tiny *random* one sampled at
temperature 1: the constraint alone guarantees what is checked (output parses and validates, or stops at
``max_tokens``).  Bad schemas, regexes, grammars, tools and tool messages are 400s naming the field, and the server
keeps serving."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field
from test_serve import _build_serve_model

from lmforge.serve.engine import Engine
from lmforge.serve.smoke import running_server

pytest.importorskip("xgrammar")

NAME = "tiny-tools"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "role": {"enum": ["admin", "user"]}},
          "required": ["name", "age", "role"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}}
TICKET = {"type": "function", "function": {
    "name": "create_ticket", "description": "Open a support ticket.",
    "parameters": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 10},
                                                    "priority": {"type": "integer", "minimum": 1, "maximum": 3}},
                   "required": ["title", "priority"]}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TICKET)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=99)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools") / NAME
    _build_serve_model(folder, ctx=1024)  # the tools' system prompt needs room
    engine = Engine.from_folder(folder, max_num_seqs=8, max_model_len=None)
    with running_server(engine, NAME) as url:
        yield url
    engine.shutdown()


@pytest.fixture
def client(server):
    return OpenAI(base_url=server, api_key="none", max_retries=0, timeout=120)


def _valid(choice, schema) -> bool:
    """Parses and validates, or was cut by max_tokens; True when it completed."""
    if choice.finish_reason == "length":
        return False
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), schema)
    return True


def _calls_ok(choice, names=SCHEMAS) -> int:
    """Every complete call names a given function and its arguments validate; returns how many."""
    calls = choice.message.tool_calls or []
    done = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    for c in done:
        assert c.type == "function" and c.id and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    return len(done)


# -- response_format and vLLM's guided fields ---------------------------------------------------------------------
def test_response_format_json_schema_and_json_object(client):
    resp = client.chat.completions.create(
        model=NAME, messages=ASK, temperature=1.0, max_tokens=80, n=4, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert sum(_valid(c, PERSON) for c in resp.choices) >= 2
    resp = client.chat.completions.create(model=NAME, messages=ASK, temperature=1.0, max_tokens=60, seed=1,
                                          response_format={"type": "json_object"})
    c = resp.choices[0]
    assert c.finish_reason == "length" or isinstance(json.loads(c.message.content), dict)


def test_parse_with_a_pydantic_model(client):
    parsed = 0
    for seed in range(3):
        resp = client.chat.completions.parse(model=NAME, messages=ASK, response_format=Person, temperature=1.0,
                                             max_tokens=60, seed=seed)
        c = resp.choices[0]
        if c.finish_reason == "stop":
            assert isinstance(c.message.parsed, Person)
            parsed += 1
    assert parsed >= 1


def test_vllm_guided_fields_on_chat_and_completions(client):
    r = client.chat.completions.create(model=NAME, messages=ASK, temperature=1.0, max_tokens=20,
                                       extra_body={"guided_choice": ["sunny", "rainy"]})
    assert r.choices[0].message.content in ("sunny", "rainy")
    r = client.completions.create(model=NAME, prompt="Code:", temperature=1.0, max_tokens=20,
                                  extra_body={"guided_regex": r"[A-Z]{3}-[0-9]{2}"})
    import re
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", r.choices[0].text)
    r = client.completions.create(model=NAME, prompt="Answer:", temperature=1.0, max_tokens=20,
                                  extra_body={"guided_grammar": 'root ::= "yes" | "no" | "maybe"'})
    assert r.choices[0].text in ("yes", "no", "maybe")
    r = client.chat.completions.create(model=NAME, messages=ASK, temperature=1.0, max_tokens=80, seed=2,
                                       extra_body={"structured_outputs": {"json": PERSON}})
    _valid(r.choices[0], PERSON)
    r = client.completions.create(model=NAME, prompt="A person:", temperature=1.0, max_tokens=80, seed=2,
                                  extra_body={"guided_json": PERSON})
    assert r.choices[0].finish_reason == "length" or jsonschema.validate(json.loads(r.choices[0].text), PERSON) is None


# -- tools ------------------------------------------------------------------------------------------------------------
def test_tool_choice_required_named_auto_and_none(client):
    done = 0
    for seed in range(3):
        r = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER, TICKET], tool_choice="required",
                                           temperature=1.0, max_tokens=120, seed=seed)
        c = r.choices[0]
        assert c.message.tool_calls and c.message.content is None
        assert c.finish_reason in ("tool_calls", "length")
        done += _calls_ok(c)
    assert done >= 2
    r = client.chat.completions.create(
        model=NAME, messages=ASK, tools=[WEATHER, TICKET], parallel_tool_calls=False, temperature=1.0,
        max_tokens=120, seed=0, tool_choice={"type": "function", "function": {"name": "create_ticket"}})
    c = r.choices[0]
    assert [t.function.name for t in c.message.tool_calls] == ["create_ticket"]
    _calls_ok(c, {"create_ticket"})
    for seed in range(3):  # auto: text, or calls that validate
        r = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER, TICKET], temperature=1.0,
                                           max_tokens=40, seed=seed)
        c = r.choices[0]
        assert "<tool_call>" not in (c.message.content or "")
        _calls_ok(c)
    r = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], tool_choice="none",
                                       temperature=1.0, max_tokens=20, seed=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def _stream_calls(client, **kw):
    """Accumulate a streamed answer the way OpenAI clients do."""
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            d = ch.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                if tc.id:  # a call starts: id, type and name come first
                    assert tc.index not in calls and tc.function.name and tc.type == "function"
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments or ""}
                else:
                    calls[tc.index]["arguments"] += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    return content or None, [calls[i] for i in sorted(calls)], reason


def test_streamed_tool_calls_equal_the_non_streaming_answer(client):
    for seed, choice in ((0, "required"), (1, "required"), (4, "auto")):
        kw = dict(model=NAME, messages=ASK, tools=[WEATHER, TICKET], tool_choice=choice, temperature=1.0,
                  max_tokens=120, seed=seed)
        whole = client.chat.completions.create(**kw).choices[0]
        content, calls, reason = _stream_calls(client, **kw)
        assert reason == whole.finish_reason
        assert content == whole.message.content
        assert [(c["name"], c["arguments"]) for c in calls] == \
            [(t.function.name, t.function.arguments) for t in whole.message.tool_calls or []]


def test_manual_tool_loop(client):
    def get_weather(city: str, unit: str = "c") -> str:
        return json.dumps({"city": city, "temperature": 18, "unit": unit})

    messages = list(ASK)
    r = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], tool_choice="required",
                                       parallel_tool_calls=False, temperature=1.0, max_tokens=120, seed=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    messages.append(msg.model_dump(exclude_none=True))
    for call in msg.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id,
                         "content": get_weather(**json.loads(call.function.arguments))})
    final = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER], tool_choice="none",
                                           temperature=1.0, max_tokens=20, seed=0)
    assert final.choices[0].message.tool_calls is None and final.choices[0].message.content is not None


def test_langchain_bind_tools_and_with_structured_output(server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    class CityArgs(BaseModel):
        city: str = Field(max_length=8, description="The city.")

    @tool(args_schema=CityArgs)
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(model=NAME, base_url=server, api_key="none", temperature=1.0, max_tokens=150, seed=0,
                     max_retries=0)
    ai = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False).invoke("Weather in Paris?")
    assert ai.response_metadata["finish_reason"] == "tool_calls" and not ai.invalid_tool_calls
    assert [c["name"] for c in ai.tool_calls] == ["get_weather"]
    CityArgs.model_validate(ai.tool_calls[0]["args"])

    class City(BaseModel):
        name: str = Field(max_length=10)
        population: int = Field(ge=0, le=10_000_000)

    structured = llm.with_structured_output(City, include_raw=True)
    out = structured.invoke("A city:")
    if out["raw"].response_metadata.get("finish_reason") == "stop":
        assert isinstance(out["parsed"], City)


# -- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"extra_body": {"guided_regex": "([a-z"}}, "guided_regex"),
    ({"extra_body": {"guided_grammar": 'root ::= ("a" | "b"'}}, "guided_grammar"),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["b"]}}, "guided_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "messages[1].tool_call_id"),
])
def test_bad_structured_requests_are_400s_naming_the_field(client, kw, param):
    kw = {"model": NAME, "messages": ASK, "max_tokens": 5, **kw}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kw)
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body
    ok = client.chat.completions.create(model=NAME, messages=ASK, max_tokens=3)  # everyone else is still served
    assert ok.choices[0].finish_reason in ("stop", "length")
